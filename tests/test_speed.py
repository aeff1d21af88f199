"""[speed]: the fast paths keep every guarantee — reused output memory is never overwritten before
it is written, and the cheap finiteness check falls back to the exact one instead of guessing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.engine import kernels
from hf_metagpt.engine.writer import OutputArena


def test_output_arena_reuses_a_turns_memory_only_after_its_writes_are_done():
    arena = OutputArena(slots=2)
    first = arena.take()
    a = first((1000,), torch.bfloat16)  # the first turn has no buffer yet: fresh memory
    first((3,), torch.int64)
    write = Future()
    arena.hold(write)
    arena.take()((10,), torch.float32)
    # Turn 0 again: it now has a buffer sized for what it asked (2000 bytes, aligned, then 24)…
    done_at: list[float] = []

    def finish_write():
        time.sleep(0.3)
        done_at.append(time.perf_counter())
        write.set_result(None)

    threading.Thread(target=finish_write).start()
    again = arena.take()  # …but only once the write that reads `a` is done
    taken_at = time.perf_counter()
    assert done_at and taken_at >= done_at[0]
    b = again((1000,), torch.bfloat16)
    c = again((3,), torch.int64)
    assert b.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()  # one buffer, carved
    assert c.data_ptr() - b.data_ptr() == 2048  # 2000 bytes, aligned to 64
    assert c.data_ptr() % 64 == 0
    assert a.data_ptr() != b.data_ptr()
    # A request past the buffer gets fresh memory this turn; the next turn of this slot fits it.
    d = again((5000,), torch.bfloat16)
    assert d.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    arena.take()
    big = arena.take()
    e = big((5000,), torch.bfloat16)
    assert e.untyped_storage().nbytes() >= 2048 + 64 + 10000  # what turn 0 asked for last time


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finite_sum_says_nonfinite_for_nan_and_inf_and_is_the_sum_otherwise(dtype):
    t = torch.tensor([1.5, -2.0, 0.25], dtype=dtype)
    assert float(kernels.finite_sum(t)) == -0.25
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[1] = bad
        assert not torch.isfinite(kernels.finite_sum(u))


def test_large_finite_bf16_values_whose_float32_sum_overflows_still_merge(tmp_path):
    """The fast check's float32 sum overflows here; the exact check then finds nothing wrong."""
    base, fts = build_family(tmp_path / "fam", n_models=2, spec=TinySpec(dtype=torch.bfloat16))
    big = torch.finfo(torch.bfloat16).max
    for folder in [base, *fts]:
        for shard in folder.glob("*.safetensors"):
            tensors = load_file(shard)
            if "model.norm.weight" in tensors:
                tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], big)
                save_file(tensors, shard, metadata={"format": "pt"})
    assert not torch.isfinite(kernels.finite_sum(torch.full((4,), big, dtype=torch.bfloat16)))
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "out"),
                     device="cpu", progress=False)
    merged = {k: v for s in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(s).items()}
    assert torch.equal(merged["model.norm.weight"],
                       torch.full_like(merged["model.norm.weight"], big))
