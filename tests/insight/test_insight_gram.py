"""Gram kernels: τi·τj against float64 dot products of formed task vectors, diagonals bit for bit."""

from __future__ import annotations

import pytest
import torch

from hf_metagpt.engine import kernels
from hf_metagpt.engine.gram import LowRank, lowrank_dense_dot, lowrank_dot, lowrank_sq_norm, mixed_gram, tau_gram, task_gram
from hf_metagpt.methods.base import squared_norm
from oracles import lora_sq_norm, lowrank_dense, task_sq_norms


def _models(shape=(13, 11), n=3, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    common = torch.randn(shape, generator=g) * 1e-3
    # Shared component: the task vectors are far from orthogonal, so off-diagonals are not ~0.
    fts = [(base.float() + common * (i % 2 * 2 - 1) + torch.randn(shape, generator=g) * 1e-3 * (i + 1)).to(dtype)
           for i in range(n)]
    return base, fts


def _reference(base, fts, rows=None):
    taus = [(f[:rows] if rows else f).double().reshape(-1) - (base[:rows] if rows else base).double().reshape(-1)
            for f in fts]
    return torch.tensor([[float(ti @ tj) for tj in taus] for ti in taus], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 7, 50])
def test_task_gram_equals_float64_dot_products_and_its_diagonal_is_task_sq_norms(dtype, chunk):
    base, fts = _models(dtype=dtype)
    got = task_gram(base, fts, chunk=chunk)
    torch.testing.assert_close(got, _reference(base, fts), rtol=1e-12, atol=0)
    assert torch.equal(got, got.t())
    # Bit for bit: a ledger keeping G instead of the norms changes no λ.
    norms = task_sq_norms(base, fts, chunk=chunk)
    assert torch.equal(torch.diagonal(got), norms)
    assert got[0, 1] < 0 < got[0, 2]  # the shared component, with its sign


def test_task_gram_diagonal_on_row_cut_default_chunk_and_large_tensor_is_bit_identical():
    base, fts = _models(shape=(700, 900), n=4, dtype=torch.bfloat16)  # 2.4 default chunks, ragged end
    for rows in (None, 333):
        got = task_gram(base, fts, rows=rows)
        assert torch.equal(torch.diagonal(got), task_sq_norms(base, fts, rows=rows))
        torch.testing.assert_close(got, _reference(base, fts, rows), rtol=1e-12, atol=0)


def test_task_gram_follows_a_patched_chunk_size_like_the_norm_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 7)
    base, fts = _models(dtype=torch.float32)
    assert torch.equal(torch.diagonal(task_gram(base, fts)), task_sq_norms(base, fts, chunk=7))


def test_task_gram_empty_and_nan():
    base, fts = _models()
    assert torch.equal(task_gram(base[:0], [f[:0] for f in fts]), torch.zeros(3, 3, dtype=torch.float64))
    fts[1] = fts[1].clone()
    fts[1][3, 3] = float("nan")
    g = task_gram(base, fts)
    assert torch.isnan(g[1]).all() and torch.isnan(g[:, 1]).all()
    assert torch.isfinite(g[0, 2]) and torch.isfinite(g[2, 2])


def test_tau_gram_diagonal_is_squared_norm_and_off_diagonal_is_the_dot_product():
    base, fts = _models(shape=(37, 29), dtype=torch.float32)
    taus = [f.float() - base.float() for f in fts]
    got = tau_gram(taus, chunk=100)
    assert [float(x) for x in torch.diagonal(got)] == [squared_norm(t) for t in taus]
    torch.testing.assert_close(got, _reference(base, fts), rtol=1e-6, atol=0)  # τ rounded to float32 once
    ref = torch.stack([t.double().reshape(-1) for t in taus])
    torch.testing.assert_close(got, ref @ ref.t(), rtol=1e-12, atol=0)


def _lowrank(m, n, r, scale, transposed, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # Δ = (B·A)ᵀ has shape (m, n): B is (n, r), A is (r, m)
        return LowRank(torch.randn(n, r, generator=g).to(dtype), torch.randn(r, m, generator=g).to(dtype), scale, True)
    return LowRank(torch.randn(m, r, generator=g).to(dtype), torch.randn(r, n, generator=g).to(dtype), scale, False)


@pytest.mark.parametrize("tx,ty", [(False, False), (True, True), (True, False), (False, True)])
def test_lowrank_dot_equals_formed_deltas(tx, ty):
    x = _lowrank(23, 17, 4, 2.0, tx, 1)
    y = _lowrank(23, 17, 6, 0.25, ty, 2, torch.bfloat16)
    assert x.shape == y.shape == (23, 17)
    want = float((lowrank_dense(x) * lowrank_dense(y)).sum())
    assert lowrank_dot(x, y) == pytest.approx(want, rel=1e-12)
    assert lowrank_dot(y, x) == pytest.approx(want, rel=1e-12)


def test_lowrank_sq_norm_is_lora_sq_norm_bit_for_bit():
    for t in (False, True):
        x = _lowrank(31, 19, 8, 16 / 8, t, 3, torch.bfloat16)
        assert lowrank_sq_norm(x) == lora_sq_norm(x.b, x.a, x.scale)
        assert lowrank_dot(x, x) == lowrank_sq_norm(x)
        assert lowrank_sq_norm(x) == pytest.approx(float((lowrank_dense(x) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_against_a_full_fine_tune_without_forming_either(transposed):
    base, fts = _models(shape=(41, 23), n=1, dtype=torch.bfloat16)
    x = _lowrank(41, 23, 5, 0.5, transposed, 4)
    tau = fts[0].double() - base.double()
    want = float((lowrank_dense(x) * tau).sum())
    # Blocks of 3 rows: many blocks and a ragged last one.
    assert lowrank_dense_dot(x, fts[0], minus=base, block=3 * 23) == pytest.approx(want, rel=1e-12)
    assert lowrank_dense_dot(x, tau.float()) == pytest.approx(float((lowrank_dense(x) * tau.float().double()).sum()), rel=1e-12)
    # Shared vocabulary rows: the adapter's factors are cut by the caller, τ by `rows`.
    cut = LowRank(x.b, x.a[:, :30], x.scale, True) if transposed else LowRank(x.b[:30], x.a, x.scale, False)
    want_cut = float((lowrank_dense(cut) * tau[:30]).sum())
    assert lowrank_dense_dot(cut, fts[0], minus=base, rows=30, block=50) == pytest.approx(want_cut, rel=1e-12)


def test_lowrank_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different shapes"):
        lowrank_dot(_lowrank(5, 4, 2, 1.0, False, 1), _lowrank(4, 5, 2, 1.0, False, 2))
    with pytest.raises(ValueError, match="against a tensor of shape"):
        lowrank_dense_dot(_lowrank(5, 4, 2, 1.0, False, 1), torch.zeros(4, 5))


def test_mixed_gram_of_adapters_full_fine_tunes_and_untouched_tensors():
    base, fts = _models(shape=(19, 13), n=2, dtype=torch.float32)
    taus = [f - base for f in fts]
    lora1 = _lowrank(19, 13, 3, 2.0, False, 5)
    lora2 = _lowrank(19, 13, 2, 0.5, True, 6)  # an embedding-style (B·A)ᵀ update
    parts = [taus[0], lora1, None, lora2, taus[1]]
    got = mixed_gram(parts, chunk=17)
    dense = [taus[0].double(), lowrank_dense(lora1), torch.zeros(19, 13, dtype=torch.float64), lowrank_dense(lora2), taus[1].double()]
    want = torch.tensor([[float((p * q).sum()) for q in dense] for p in dense], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
    assert torch.equal(got, got.t())
    assert float(got[0, 0]) == squared_norm(taus[0])
    assert float(got[1, 1]) == lora_sq_norm(lora1.b, lora1.a, lora1.scale)
    assert got[2].abs().sum() == 0
