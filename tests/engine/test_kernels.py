"""Fused chunked kernels, the large-read reader, and the methods' weighted-sum hook."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_metagpt import constants
from hf_metagpt.engine import kernels
from hf_metagpt.methods import METHODS, get_method
from hf_metagpt.engine.reader import BufferPool, read_tensors
from hf_metagpt.safetensors_io import read_header
from oracles import CHUNK, task_sq_norms
from reference import assert_within_ulp


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 7)  # many chunks, a ragged last one
    monkeypatch.setattr(kernels, "MERGE_CHUNK", 7)


def _models(shape=(13, 11), n=3, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    fts = [(base.float() + torch.randn(shape, generator=g) * 1e-3 * (i + 1)).to(dtype) for i in range(n)]
    return base, fts


def test_task_sq_norms_equal_float64_reference(small_chunks):
    base, fts = _models()
    got = task_sq_norms(base, fts, chunk=7).tolist()
    want = [float(((f.double() - base.double()) ** 2).sum()) for f in fts]
    assert got == pytest.approx(want, rel=1e-12)


def test_task_sq_norms_on_shared_rows_and_nan_propagates(small_chunks):
    base, fts = _models()
    got = task_sq_norms(base, fts, rows=5, chunk=7).tolist()
    want = [float(((f[:5].double() - base[:5].double()) ** 2).sum()) for f in fts]
    assert got == pytest.approx(want, rel=1e-12)
    fts[1] = fts[1].clone()
    fts[1][12, 3] = float("nan")
    norms = task_sq_norms(base, fts, chunk=7)
    assert torch.isfinite(norms).tolist() == [True, False, True]


def test_the_norm_oracle_chunks_as_the_engine_does():
    assert CHUNK == kernels.CHUNK  # tests/oracles.task_sq_norms' default chunk is the engine's


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_models_within_one_ulp(small_chunks, out_dtype):
    base, fts = _models()
    lam = [0.2, 0.3, 0.5]
    got = kernels.weighted_models(base, fts, 1.0 - sum(lam), lam, out_dtype)
    exact = base.double() + sum(l * (f.double() - base.double()) for l, f in zip(lam, fts))
    scale = torch.stack([t.double().abs() for t in [base, *fts]]).amax(0)
    assert_within_ulp(got, exact, out_dtype, ulps=1 if out_dtype != torch.float32 else 2,
                      scale=None if out_dtype != torch.float32 else scale)


def test_weighted_models_zero_weights_is_the_base_bit_for_bit(small_chunks):
    base, fts = _models()
    got = kernels.weighted_models(base, fts, 1.0, [0.0, 0.0, 0.0], torch.bfloat16, rows=9)
    assert torch.equal(got, base[:9])


def test_model_weights_hook_agrees_with_combine():
    torch.manual_seed(0)
    base, taus = torch.randn(40), [torch.randn(40) for _ in range(3)]
    from hf_metagpt.methods import MergeMethod

    checked = 0
    for name in METHODS:
        method = get_method(name)
        if type(method).transform is not MergeMethod.transform or type(method).model_weights is MergeMethod.model_weights:
            continue  # the engine uses the hook only for untransformed task vectors, where there is one
        coeffs = method.coefficients([1.0, 2.0, 3.0] if method.uses_group_norms else None, 3)
        hook = method.model_weights(coeffs)
        if hook is None:
            continue
        w0, w = hook
        want = method.combine(base.clone(), [t.clone() for t in taus], coeffs)
        got = w0 * base + sum(wi * (base + t) for wi, t in zip(w, taus))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked >= 3  # metagpt, task_arithmetic, linear


def test_reader_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.randn(4),
               "d": torch.tensor(3.0, dtype=torch.float16), "e": torch.zeros(0, 3)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    metas = read_header(path)
    ref = load_file(path)
    got = read_tensors(path, list(metas.values()))
    pool = BufferPool()
    some = read_tensors(path, [metas["c"], metas["a"]], buffer=pool.take(1 << 12))
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
    assert torch.equal(some["a"], ref["a"]) and torch.equal(some["c"], ref["c"])


def test_reader_reports_truncation(tmp_path):
    from hf_metagpt.errors import InputError

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100)}, path)
    metas = read_header(path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(InputError, match="ended early"):
        read_tensors(path, list(metas.values()))


def test_shard_writer_in_any_order_and_slabs_starts_writeback_and_writes_what_safetensors_reads(tmp_path, monkeypatch):
    import os

    from hf_metagpt.engine import reader
    from hf_metagpt.engine import writer as safetensors_io

    calls = []
    real = os.posix_fadvise
    monkeypatch.setenv(constants.DIRECT_ENV, "0")  # the buffered path (tests/engine/test_speed.py: O_DIRECT)
    monkeypatch.setattr(safetensors_io, "WRITEBACK_STEP", 100)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (calls.append((off, n, adv)), real(fd, off, n, adv))[1])
    a, b, c = torch.randn(8, 16).bfloat16(), torch.arange(10, dtype=torch.int64), torch.zeros(0, 4)
    path = tmp_path / "s.safetensors"
    w = safetensors_io.ShardWriter(path, [("a", "BF16", (8, 16)), ("b", "I64", (10,)), ("c", "F32", (0, 4))])
    with pytest.raises(RuntimeError, match="planned 80 more"):
        w.write("b", b[:5])  # a whole tensor must come whole
    w.write("b", b)  # the last tensor first: each goes to its own place
    with pytest.raises(RuntimeError, match="got b, which it already has"):
        w.write("b", b)
    with pytest.raises(RuntimeError, match="got d, which it does not hold"):
        w.write("d", b)
    for lo in range(0, 8, 3):  # row slabs 3 + 3 + 2, in row order
        w.write("a", a[lo:lo + 3], part=True)
    assert not w.done  # the empty tensor still has to come
    w.write("c", c)
    assert w.done
    w.close()
    got = load_file(path)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and got["c"].shape == (0, 4)
    assert path.stat().st_size == w.size
    # Write-back was started for exactly the bytes written (b first, then a's slabs), at least the step at a time.
    header = len(w.header)
    assert all(adv == os.POSIX_FADV_DONTNEED for *_, adv in calls)
    assert sorted((o, n) for o, n, _ in calls) == [(header, 96), (header + 96, 96), (header + 192, 64), (header + 256, 80)]


def _chunked_reference_gram(base, fts, chunk):
    """G[j, i] the way the Gram kernel has always summed it: per chunk, a fresh float64 buffer per
    model's difference, one `torch.dot` per pair, added into an accumulator from 0 in chunk order."""
    from hf_metagpt.engine.gram import _mirror

    b, ms = base.reshape(-1), [f.reshape(-1) for f in fts]
    acc = torch.zeros(len(ms), len(ms), dtype=torch.float64)
    for lo in range(0, b.numel(), chunk):
        bb = b[lo:lo + chunk].double()
        ts = [m[lo:lo + chunk].double() - bb for m in ms]
        for i in range(len(ts)):
            for j in range(i + 1):
                acc[j, i] += torch.dot(ts[j], ts[i])
    return _mirror(acc)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("offset", [0, 3])
def test_task_gram_is_the_chunk_by_chunk_sum_bit_for_bit(chunk, offset):
    """The Gram kernel's dot products in one torch call each and added afterwards give the bits the
    per-chunk accumulation gave (λ depend on them); unaligned views and a ragged last chunk too."""
    from hf_metagpt.engine.gram import task_gram

    base, fts = _models(shape=(61, 67), n=4)
    base, fts = base.reshape(-1)[offset:], [f.reshape(-1)[offset:] for f in fts]
    got = task_gram(base, fts, chunk=chunk)
    want = _chunked_reference_gram(base, fts, chunk)
    assert torch.equal(got, want)
    assert torch.equal(torch.diagonal(got), task_sq_norms(base, fts, chunk=chunk))
    assert got[0, 1] != 0.0 and torch.equal(got, got.t())


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_models_bytes_do_not_depend_on_the_chunk(out_dtype, in_dtype):
    """Elementwise arithmetic: chunks of 64, 4096 and the defaults give the bytes of one whole-tensor
    float64 computation with the same torch ops (so MERGE_CHUNK is free to tune), and adding each
    model's chunk straight from its stored dtype (the CPU kernel) gives the bytes of converting it
    to float64 first."""
    base, fts = _models(shape=(3 * 4096 + 77,), n=3, dtype=in_dtype)
    w0, lam = 0.37, [0.3, 0.0, -0.45]
    whole = base.double().mul_(w0)
    for w, f in zip(lam, fts):
        if w:
            whole.add_(f.double(), alpha=w)
    want = whole.to(out_dtype)
    for chunk in (64, 4096, None, kernels.CHUNK):
        total = torch.zeros((), dtype=torch.float64)
        got = kernels.weighted_models(base, fts, w0, lam, out_dtype, chunk=chunk, out_sum=total)
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(torch.uint8)), chunk
        assert float(total) == pytest.approx(float(want.double().sum()), rel=1e-5, abs=1e-6)


def test_weighted_models_out_sum_is_not_finite_for_nan_and_for_an_overflowing_output():
    base = torch.zeros(5000, dtype=torch.bfloat16)
    fts = [base.clone() for _ in range(3)]
    fts[2][4999] = float("nan")
    total = torch.zeros((), dtype=torch.float64)
    kernels.weighted_models(base, fts, 1.0, [0.3, 0.3, 0.3], torch.bfloat16, chunk=64, out_sum=total)
    assert not torch.isfinite(total)
    big = torch.full((5000,), 60000.0, dtype=torch.bfloat16)
    total = torch.zeros((), dtype=torch.float64)
    out = kernels.weighted_models(big, [big, big], 1.0, [1.0, 1.0], torch.float16, chunk=64, out_sum=total)
    assert torch.isinf(out).all() and not torch.isfinite(total)
    total = torch.zeros((), dtype=torch.float64)
    kernels.weighted_models(big, [big], 0.5, [0.5], torch.float16, chunk=64, out_sum=total)
    assert float(total) == 5000 * float(big[0])  # 59904: 60000 in bfloat16


def test_the_device_side_chunk_sum_equals_the_host_one():
    """`_add_in_order` on a GPU adds on the device (no read back); run here on CPU tensors, both ways
    give the same bits, chunk after chunk from 0.0."""
    from hf_metagpt.engine.gram import _add_in_order

    g = torch.Generator().manual_seed(3)
    pairs = [(j, i) for i in range(3) for j in [i, *range(i)]]
    dots = torch.randn(5, len(pairs), generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 5, dtype=torch.float64)[:, None]
    host = _add_in_order(dots, pairs, 3, on_host=True)
    device = _add_in_order(dots, pairs, 3, on_host=False)
    assert torch.equal(host, device)
    want = 0.0
    for c in range(5):
        want += float(dots[c, pairs.index((0, 2))])
    assert float(host[0, 2]) == want and float(host[2, 0]) == 0.0  # upper triangle; the caller mirrors it
