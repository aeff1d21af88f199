"""[speed]: the fast paths keep every guarantee — reused output memory is never overwritten before
it is written, and the cheap finiteness check falls back to the exact one instead of guessing."""

from __future__ import annotations

import os
import threading
import time
import zlib
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt import constants
from hf_metagpt._platform import page_cached
from hf_metagpt.demo.tiny import TinySpec, build_family
from helpers import shards
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

    from hf_metagpt.sources import archcache
    from hf_metagpt.sources.architecture import skeleton_names

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
    from hf_metagpt.constants import ARCH_CACHE_ENV

    monkeypatch.setenv(ARCH_CACHE_ENV, "0")
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
        assert w.crcs == {k: zlib.crc32(v.contiguous().view(torch.uint8).numpy().tobytes())
                          for k, v in tensors.items()}
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    # Where the file system takes O_DIRECT, every shard above was written with it.
    assert direct in (0, 25)


def test_a_merge_writes_the_same_bytes_direct_and_buffered(tmp_path, monkeypatch):
    base, fts = build_family(tmp_path / "fam", n_models=3, spec=TinySpec(dtype=torch.bfloat16))
    args = dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False, max_shard_size="50KB")
    hf_metagpt.merge(output=str(tmp_path / "direct"), **args)
    monkeypatch.setenv(constants.DIRECT_ENV, "0")
    hf_metagpt.merge(output=str(tmp_path / "buffered"), **args)
    direct = shards(tmp_path / "direct")
    assert len(direct) > 2 and direct == shards(tmp_path / "buffered")


# ---------------------------------------------------------------- exactness of the fused weighted sum

def _ulp(x, dtype: torch.dtype):
    """One ulp of `dtype` at the exact value x (a Fraction), taken in the lower binade at a power of two."""
    import math
    from fractions import Fraction

    info = torch.finfo(dtype)
    digits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    tiny = Fraction(info.smallest_normal)
    sub = tiny / 2 ** (digits - 1)  # the subnormal spacing
    ax = abs(x)
    if ax < tiny:
        return sub
    _, e = math.frexp(float(ax) * (1 - 2 ** -40))  # ax < 2**e (lower binade at an exact power of two)
    return max(Fraction(2) ** (e - digits), sub)


def _within_one_ulp(out: torch.Tensor, base, models, w0, weights) -> list[int]:
    """Indices where `out` is more than one ulp of its dtype from the exact Σ w·θ (rational arithmetic)."""
    from fractions import Fraction

    bad = []
    cols = [base.double().tolist(), *[m.double().tolist() for m in models]]
    ws = [Fraction(w0), *map(Fraction, weights)]
    for i, got in enumerate(out.double().tolist()):
        exact = sum((w * Fraction(c[i]) for w, c in zip(ws, cols)), Fraction(0))
        if abs(Fraction(got) - exact) > _ulp(exact, out.dtype):
            bad.append(i)
    return bad


def _adversarial(case: str):
    """(base, models, w0, weights, out dtype): inputs a float32 accumulator gets wrong, or nearly."""
    g = torch.Generator().manual_seed(7)
    n = 300
    x = (1 + torch.rand(n, generator=g)).to(torch.bfloat16)
    if case == "cancellation":
        # w1·x − w2·x with w1 − w2 = 2⁻³⁰: the result is 2⁻³⁰·x, a billionth of the terms.
        base = (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
        return base, [x, -x, x], 0.0, [0.5 + 2 ** -30, 0.5, 0.0], torch.bfloat16
    if case == "cancellation-with-base":
        # θ0 + Σλ(θt − θ0) = w0·θ0 + Σλθt with w0 = 1 − Σλ = 2⁻²⁸ and λ1θ1 + λ2θ2 cancelling to 2⁻²⁸·x:
        # the result is 2⁻²⁷·x (float32 rounds λ2 to 0.5 and gets half of it).
        lam = [0.5, 0.5 - 2 ** -28, 0.0]
        return x, [x, -x, (x * 3).to(torch.bfloat16)], 1 - sum(lam), lam, torch.bfloat16
    if case == "large":
        big = (torch.rand(n, generator=g) * 3.3e38).to(torch.bfloat16)
        return big, [-big, big, (big * 0.5).to(torch.bfloat16)], 0.1, [0.3, 0.3, 0.3], torch.bfloat16
    if case == "tiny":
        small = (torch.randn(n, generator=g) * 1e-38).to(torch.bfloat16)  # bf16 subnormals and near them
        return small, [small * 3, -small, small * 0.5], 0.2, [0.3, 0.2, 0.3], torch.bfloat16
    if case == "float16-range":
        v = torch.randn(n, generator=g)
        base = (v * 3e4).to(torch.bfloat16)
        return base, [(-base * 0.999).to(torch.bfloat16), (v * 1e-5).to(torch.bfloat16), base * 0], \
            0.5, [0.5, 0.75, 0.125], torch.float16
    raise ValueError(case)


@pytest.mark.parametrize("case", ["cancellation", "cancellation-with-base", "large", "tiny", "float16-range"])
def test_fused_weighted_sum_is_within_one_ulp_of_the_exact_sum_on_adversarial_values(case, monkeypatch):
    """The bound the README states for 16-bit outputs, against exact rational arithmetic: the float64
    accumulator's error (≤ (T+2)·2⁻⁵³·Σ|w·θ|) stays far below half an output ulp even when the terms
    cancel a billion-fold; a float32 accumulator does not (asserted, so this test can tell them apart)."""
    monkeypatch.setattr(kernels, "CHUNK", 64)  # several chunks and a ragged last one
    monkeypatch.setattr(kernels, "MERGE_CHUNK", 64)
    base, models, w0, weights, out_dtype = _adversarial(case)
    out = kernels.weighted_models(base, models, w0, weights, out_dtype)
    assert torch.isfinite(out).all()
    assert _within_one_ulp(out, base, models, w0, weights) == []
    if case.startswith("cancellation"):
        f32 = (base.float() * w0 + sum(m.float() * w for m, w in zip(models, weights))).to(out_dtype)
        assert len(_within_one_ulp(f32, base, models, w0, weights)) > 100


# ---------------------------------------------------------------- direct reads

def _evict(folder):
    import os

    os.sync()
    for f in folder.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _can_probe_cache(path) -> bool:
    """Whether this file system lets the reader tell cached pages (RWF_NOWAIT) and read with O_DIRECT."""
    from hf_metagpt.engine import reader

    fd = os.open(path, os.O_RDONLY)
    try:
        if page_cached(fd, 0) is None:
            return False
    finally:
        os.close(fd)
    dfd = reader._open_direct(path)
    if dfd is None:
        return False
    os.close(dfd)
    return True


def test_direct_reads_give_the_tensors_buffered_reads_give(tmp_path):
    from hf_metagpt.engine import reader
    from hf_metagpt.safetensors_io import read_header

    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), 3, generator=g).to(dtype)
               for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float32])}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    metas = list(read_header(path).values())
    _evict(tmp_path)
    pool = torch.empty(sum(m.nbytes for m in metas) + reader.DIRECT_SLACK * len(metas), dtype=torch.uint8)
    got, used = reader.read_tensors_into(path, metas, pool[1:], direct=True)  # an odd start in the pool
    assert used <= pool.numel() - 1
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    if not _can_probe_cache(path):
        pytest.skip("no RWF_NOWAIT or O_DIRECT here: every run is read buffered")
    # A truncated file is named, direct or not.
    path.write_bytes(path.read_bytes()[:-4000])
    _evict(tmp_path)
    with pytest.raises(Exception, match="ended early"):
        reader.read_tensors(path, metas, direct=True)


def test_a_one_pass_merge_reads_directly_and_a_two_pass_merge_through_the_cache(tmp_path, monkeypatch):
    from hf_metagpt.engine import reader

    base, fts = build_family(tmp_path / "fam", n_models=3, spec=TinySpec(dtype=torch.bfloat16))
    args = dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False, max_shard_size="50KB")
    calls = []
    real = reader._read_direct
    monkeypatch.setattr(reader, "_read_direct", lambda *a: (calls.append(a[4]), real(*a))[1])
    _evict(tmp_path / "fam")
    hf_metagpt.merge(output=str(tmp_path / "layer"), granularity="layer", **args)
    direct_layer = len(calls)
    calls.clear()
    _evict(tmp_path / "fam")
    hf_metagpt.merge(output=str(tmp_path / "model"), **args)  # pass 2 reads what pass 1 left in the cache
    assert calls == []
    monkeypatch.setenv(constants.DIRECT_ENV, "0")
    _evict(tmp_path / "fam")
    hf_metagpt.merge(output=str(tmp_path / "layer-buffered"), granularity="layer", **args)
    for name in sorted(p.name for p in (tmp_path / "layer").glob("*.safetensors")):
        assert (tmp_path / "layer" / name).read_bytes() == (tmp_path / "layer-buffered" / name).read_bytes()
    if not _can_probe_cache(next(base.glob("*.safetensors"))):
        pytest.skip("no RWF_NOWAIT or O_DIRECT here: every run is read buffered")
    assert direct_layer > 0
