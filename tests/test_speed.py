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


def test_architecture_answers_are_kept_per_config_and_transformers_release(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_metagpt.engine import archcache
    from hf_metagpt.engine.plan import skeleton_names

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40}
    calls = []

    def ask():
        calls.append(1)
        return {"w": [2, 3]}

    assert archcache.cached("skeleton", config, ask) == {"w": [2, 3]}
    assert archcache.cached("skeleton", config, ask) == {"w": [2, 3]} and len(calls) == 1
    path = archcache.entry_path("skeleton", config)
    assert path.parent == tmp_path / "home" / "hf-metagpt" / "architectures"
    # Another transformers release, another config: asked again. A damaged entry: asked again.
    monkeypatch.setattr(archcache, "_transformers_version", lambda: "0.0.1")
    assert archcache.entry_path("skeleton", config) != path
    archcache.cached("skeleton", config, ask)
    archcache.cached("skeleton", {**config, "hidden_size": 32}, ask)
    assert len(calls) == 3
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    path.write_text("{not json")
    assert archcache.cached("skeleton", config, ask) == {"w": [2, 3]} and len(calls) == 4
    # No answer (an architecture transformers does not know) is not kept.
    assert archcache.cached("skeleton", {"model_type": "nope"}, lambda: None) is None
    assert not archcache.entry_path("skeleton", {"model_type": "nope"}).exists()
    # The real skeleton: the same names and shapes from transformers and from the cache.
    real = {**config, "hidden_size": 24}
    fresh = skeleton_names(real)
    assert fresh["model.layers.1.mlp.down_proj.weight"] == (24, 32)
    assert archcache.entry_path("skeleton", real).exists()
    assert skeleton_names(real) == fresh
    monkeypatch.setenv(archcache.CACHE_ENV, "0")
    assert archcache.entry_path("skeleton", real) is None
    assert skeleton_names(real) == fresh


def test_direct_writes_in_any_order_and_slabs_give_the_bytes_safetensors_reads(tmp_path):
    """O_DIRECT shards: tensors of odd sizes in random order, some in random row slabs, every block
    written once from partial edges, the bounce buffer, or memory that happens to be aligned."""
    import random

    from hf_metagpt.engine import writer

    rng = random.Random(0)
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
    direct = 0
    for trial in range(25):
        tensors = {f"t{i}": (torch.randn(rng.randint(0, 3000), rng.randint(1, 7)) * 100).to(rng.choice(list(names)))
                   for i in range(rng.randint(1, 6))}
        if trial == 0:  # whole blocks straight from aligned memory: a tensor at a block-aligned address
            tensors = {"t0": torch.randn(4096 * 3, dtype=torch.float32)}
        path = tmp_path / f"s{trial}.safetensors"
        w = writer.ShardWriter(path, [(k, names[v.dtype], tuple(v.shape)) for k, v in tensors.items()])
        direct += isinstance(w._file, writer.DirectFile)
        order = list(tensors)
        rng.shuffle(order)
        for k in order:
            t = tensors[k]
            lo = 0
            while t.shape[0] > 10 and rng.random() < 0.5 and lo < t.shape[0]:
                step = rng.randint(1, t.shape[0])
                w.write(k, t[lo:lo + step], part=True)
                lo += step
            if lo == 0:
                w.write(k, t)
            elif lo < t.shape[0]:
                w.write(k, t[lo:], part=True)
        assert w.done
        w.close()
        assert path.stat().st_size == w.size
        got = load_file(path)
        assert all(torch.equal(got[k], v) for k, v in tensors.items())
        assert w.crcs == {k: __import__("zlib").crc32(v.contiguous().view(torch.uint8).numpy().tobytes())
                          for k, v in tensors.items()}
    if not hasattr(__import__("os"), "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    # Where the file system takes O_DIRECT, every shard above was written with it.
    assert direct in (0, 25)


def test_a_merge_writes_the_same_bytes_direct_and_buffered(tmp_path, monkeypatch):
    from hf_metagpt.engine import writer

    base, fts = build_family(tmp_path / "fam", n_models=3, spec=TinySpec(dtype=torch.bfloat16))
    args = dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False, max_shard_size="50KB")
    hf_metagpt.merge(output=str(tmp_path / "direct"), **args)
    monkeypatch.setenv(writer.DIRECT_ENV, "0")
    hf_metagpt.merge(output=str(tmp_path / "buffered"), **args)
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(files) > 2
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name
