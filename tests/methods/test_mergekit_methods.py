"""The methods mergekit users pick (breadcrumbs, DELLA, SLERP, Model Stock, SCE) and per-tensor parameters.

Hand values worked out in the comments, and float64 references written here from each method's
published definition (plain numpy), driven the way the engine drives a method.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_metagpt.errors import MergeError
from hf_metagpt.methods import TensorContext, get_method, settings, sparsify
from hf_metagpt.methods.interpolation import sce_weights


def run(method, base, taus, ctx=None):
    base = torch.as_tensor(base, dtype=torch.float32)
    taus = [torch.as_tensor(t, dtype=torch.float32) for t in taus]
    ctx = ctx or TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0, 4)
    transformed = method.transform(taus, ctx)
    coeffs = method.coefficients(None, len(taus))
    return method.combine(base.clone(), transformed, coeffs, ctx), transformed


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=tol, atol=tol)


def case(shape=(6, 5), n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    taus = [torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]
    return base, taus


def layer(i, n=5, name="mlp.up_proj"):
    return TensorContext.of(f"model.layers.{i}.{name}.weight", 0, n)


# --------------------------------------------------------------------------- per-tensor settings


def test_gradient_interpolates_across_layers_like_mergekit():
    g = settings.parse_setting("m", "t", [0, 0.5, 1], lambda m, v: v)
    # layer i of 5 sits at i/4 on the list [0, 0.5, 1]
    assert [settings.resolve(g, layer(i)) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert settings.resolve(settings.parse_setting("m", "t", [2, 4, 10], lambda m, v: v), layer(3)) == 7.0
    # outside the layers (embeddings, head) and without a context: the first value
    assert settings.resolve(g, TensorContext.of("lm_head.weight", 0, 5)) == 0.0
    assert settings.resolve(g, None) == 0.0
    # a one-layer model sits at the end
    assert settings.resolve(g, TensorContext.of("model.layers.0.mlp.weight", 0, 1)) == 1.0
    assert TensorContext.of("model.layers.12.self_attn.q_proj.weight", 3, 32) == TensorContext(
        "model.layers.12.self_attn.q_proj.weight", 3, 12, 32)


def test_filters_pick_the_first_match_and_fall_through():
    s = settings.parse_setting("m", "w", [{"filter": "self_attn", "value": 0.7},
                                          {"filter": "mlp", "value": [0, 1]}], lambda m, v: v)
    assert settings.resolve(s, layer(2, name="self_attn.q_proj")) == 0.7
    assert settings.resolve(s, layer(2)) == 0.5  # mlp: the gradient at 2/4
    assert settings.resolve(s, TensorContext.of("model.norm.weight", 0, 5)) is settings.UNSET
    # unset falls through to the next place the parameter is given, then the default
    assert settings.first_set(TensorContext.of("model.norm.weight", 0, 5), s, 0.3) == 0.3
    assert settings.first_set(None, s, None, default=1.0) == 1.0
    with pytest.raises(MergeError, match="mixes numbers and other values"):
        settings.parse_setting("m", "w", [1, {"value": 2}], lambda m, v: v)
    with pytest.raises(MergeError, match="must have the keys 'filter' and 'value'"):
        settings.parse_setting("m", "w", [{"filter": "mlp"}], lambda m, v: v)


def test_per_tensor_weights_in_combine_and_in_the_fused_weights():
    ta = get_method("task_arithmetic", weights=[[0, 1], [{"filter": "self_attn", "value": 2}, {"value": 0.5}]],
                    lambda_=[1, 3])
    base, taus = [1.0, 1.0], [[1.0, 2.0], [4.0, 8.0]]
    # layer 1 of 5 (x = 1/4): w1 = 0.25, w2 = 0.5 (mlp), λ = 1.5 → 1 + 1.5·(0.25·τ1 + 0.5·τ2)
    ctx = layer(1)
    merged, _ = run(ta, base, taus, ctx)
    close(merged, [1 + 1.5 * (0.25 + 2.0), 1 + 1.5 * (0.5 + 4.0)])
    w0, w = ta.model_weights([0.0, 0.0], ctx)
    close(w, [1.5 * 0.25, 1.5 * 0.5])
    assert w0 == pytest.approx(1 - 1.5 * 0.75)
    # self_attn at layer 4: w = [1, 2], λ = 3
    close(ta.model_weights([0.0, 0.0], layer(4, name="self_attn.o_proj"))[1], [3.0, 6.0])
    # per-model density over the method-wide one (mergekit's per-model parameters)
    ties = get_method("ties", density=1.0, per_model=[{"density": 0.2}, {}])
    _, kept = run(ties, [0.0] * 5, [[5.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    close(kept[0], [5.0, 0, 0, 0, 0], tol=0)  # max(1, ⌊0.2·5⌋) = 1 entry
    close(kept[1], [1.0] * 5, tol=0)
    with pytest.raises(MergeError, match="Unknown per-model parameter 'gamma' for method 'ties'"):
        get_method("ties", per_model=[{"gamma": 0.1}])


def test_task_arithmetic_normalize_divides_by_the_weight_sum():
    ta = get_method("task_arithmetic", weights=[1, 3], normalize=True, lambda_=2)
    close(run(ta, [0.0, 0.0], [[4.0, 0.0], [0.0, 4.0]])[0], [2 * 1.0, 2 * 3.0])
    assert ta.coefficients(None, 2) == [0.5, 1.5]


# --------------------------------------------------------------------------- sparsifiers


def test_magnitude_counts_like_mergekit():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0])
    close(sparsify.magnitude(tau, 0.5), [0, -5.0, 0, 2.0], tol=0)
    close(sparsify.magnitude(tau, 0.1), [0, -5.0, 0, 0], tol=0)  # ⌊0.4⌋ = 0 → at least one kept
    # L1 rescale: kept entries carry ‖τ‖₁ = 7.4 (5 + 2 = 7)
    close(sparsify.magnitude(tau, 0.5, rescale=True), [0, -5.0 * 7.4 / 7, 0, 2.0 * 7.4 / 7])


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = torch.tensor([3.0, -10.0, 1.0, 6.0, -2.0, 9.0, 4.0, -8.0, 5.0, 7.0])
    # n = 10, keep ⌊0.6·10⌋ = 6, drop the ⌊0.2·10⌋ = 2 largest (10, 9) and the 2 smallest (1, 2)
    close(sparsify.magnitude_outliers(tau, 0.6, 0.2), [3.0, 0, 0, 6.0, 0, 0, 4.0, -8.0, 5.0, 7.0], tol=0)
    # density + gamma > 1: the outlier cut shrinks to keep 9 entries (only 10 goes)
    close(sparsify.magnitude_outliers(tau, 0.9, 0.2), [3.0, 0, 1.0, 6.0, -2.0, 9.0, 4.0, -8.0, 5.0, 7.0], tol=0)
    bc = get_method("breadcrumbs", density=0.6, gamma=0.2, weights=[0.5, 1.0])
    other = torch.tensor([1.0] * 10)
    merged, _ = run(bc, [0.0] * 10, [tau, other])
    # no sign election: 0.5·breadcrumbs(τ) + 1·breadcrumbs(ones); all-equal ones keep the 6 that
    # torch's sort puts in the middle, whatever they are: their sum is 6
    assert float((merged - 0.5 * sparsify.magnitude_outliers(tau, 0.6, 0.2)).sum()) == pytest.approx(6.0)


def test_della_probabilities_follow_the_magnitude_rank():
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    # ranks 1, 4, 3, 2 → (rank − 1)/3 → density − ε + 2ε·that
    close(sparsify.della_probabilities(tau, 0.5, 0.1), [[0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3]])
    big = torch.randn(400, 500, generator=torch.Generator().manual_seed(2))
    out = sparsify.della_magprune(big, 0.3, 0.2, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # the largest half is kept more often: mean keep probability 0.4 vs 0.2
    top = big.abs() > big.abs().median(dim=1, keepdim=True).values
    assert abs(kept[top].float().mean().item() - 0.4) < 0.01
    assert abs(kept[~top].float().mean().item() - 0.2) < 0.01
    torch.testing.assert_close(out.double().abs().sum(), big.double().abs().sum(), rtol=1e-5, atol=0)
    with pytest.raises(MergeError, match="density ± epsilon must stay inside"):
        run(get_method("della", density=0.1, epsilon=0.15), [0.0] * 4, [[1.0, 2.0, 3.0, 4.0]])


def test_della_is_reproducible_per_seed_and_tensor():
    _, taus = case((32, 32))
    m = get_method("della", density=0.5, epsilon=0.1)
    a = m.transform(taus, TensorContext("model.layers.1.mlp.up_proj.weight", 4))
    b = m.transform(taus, TensorContext("model.layers.1.mlp.up_proj.weight", 4))
    c = m.transform(taus, TensorContext("model.layers.1.mlp.up_proj.weight", 5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0] != 0, c[0] != 0)


def test_della_linear_and_della_reference_given_the_masks():
    base, taus = case((8, 7), seed=3)
    w = [0.5, 0.3, 0.2]
    ctx = TensorContext("model.layers.0.mlp.down_proj.weight", 11, 0, 2)
    for name, elect, normalize in (("della_linear", False, False), ("della", True, True)):
        m = get_method(name, density=0.5, epsilon=0.1, weights=w)
        merged, out = run(m, base, taus, ctx)
        # rebuild the masks drawn (no τ entry is 0) and check everything after them in float64
        dropped = get_method("della_linear", density=0.5, epsilon=0.1).transform(taus, ctx)
        t64 = [t.double().numpy() for t in taus]
        d64 = [np.where(d.numpy() != 0, t, 0.0) for d, t in zip(dropped, t64)]
        d64 = [d * np.abs(t).sum() / np.abs(d).sum() for d, t in zip(d64, t64)]
        votes = [wi * d for wi, d in zip(w, d64)]
        if elect:
            sign = np.where(sum(votes) >= 0, 1.0, -1.0)
            agree = [np.sign(v) == sign for v in votes]
        else:
            agree = [np.ones_like(v, dtype=bool) for v in votes]
        mixed = sum(np.where(a, v, 0.0) for a, v in zip(agree, votes))
        if normalize:
            div = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
            mixed = mixed / np.where(div == 0, 1.0, div)
        close(merged, base.double().numpy() + mixed, tol=1e-5)


# --------------------------------------------------------------------------- SLERP


def ref_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.ravel().astype(np.float64), v1.ravel().astype(np.float64)
    dot = float(np.clip((a / np.linalg.norm(a)) @ (b / np.linalg.norm(b)), -1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    om = math.acos(dot)
    return ((math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)).reshape(v0.shape)


def test_slerp_hand_values():
    s = get_method("slerp", t=0.5)
    # θ0 = [1, 0], θ1 = [0, 1] (τ = [-1, 1]): a quarter turn, halfway is [√½, √½]
    close(run(s, [1.0, 0.0], [[-1.0, 1.0]])[0], [math.sqrt(0.5)] * 2)
    close(run(get_method("slerp", t=0.0), [1.0, 0.0], [[-1.0, 1.0]])[0], [1.0, 0.0])
    close(run(get_method("slerp", t=1.0), [1.0, 0.0], [[-1.0, 1.0]])[0], [0.0, 1.0])
    # parallel: linear interpolation, (1 − t)·θ0 + t·θ1 with θ1 = 3θ0
    close(run(get_method("slerp", t=0.25), [1.0, 2.0], [[2.0, 4.0]])[0], [1.5, 3.0])


def test_slerp_matches_reference_with_t_per_layer_and_filter():
    s = get_method("slerp", t=[{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}])
    base, (tau,) = case((9, 4), n=1, seed=5)
    for ctx, t in ((layer(1, name="self_attn.q_proj"), 0.25), (layer(3, name="self_attn.v_proj"), 0.75),
                   (layer(1), 0.3)):
        merged, _ = run(s, base, [tau], ctx)
        close(merged, ref_slerp(t, base.double().numpy(), (base + tau).double().numpy()), tol=1e-5)
    with pytest.raises(MergeError, match="merges the base with exactly one other model"):
        s.coefficients(None, 2)
    with pytest.raises(MergeError, match=r"t must be in \[0, 1\]"):
        get_method("slerp", t=1.5)


# --------------------------------------------------------------------------- Model Stock


def ref_model_stock(base: np.ndarray, taus: list[np.ndarray]) -> np.ndarray:
    n = len(taus)
    cos = [float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))
           for i, a in enumerate(taus) for b in taus[i + 1:]]
    c = sum(cos) / len(cos)
    t = n * c / (1 + (n - 1) * c)
    return t * (base + sum(taus) / n) + (1 - t) * base


def test_model_stock_hand_values_and_reference():
    ms = get_method("model_stock")
    # orthogonal task vectors: cos 0 → t = 0 → the base
    close(run(ms, [1.0, 1.0], [[1.0, 0.0], [0.0, 1.0]])[0], [1.0, 1.0])
    # identical ones: cos 1 → t = 2/(1 + 1) = 1 → their average
    close(run(ms, [1.0, 1.0], [[2.0, 4.0], [2.0, 4.0]])[0], [3.0, 5.0])
    # three unit vectors 60° and 120° apart:
    taus = [[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-0.5, math.sqrt(3) / 2]]
    # cosines: τ1·τ2 = ½, τ1·τ3 = −½, τ2·τ3 = ½ → mean 1/6 → t = (3/6)/(1 + 2/6) = 3/8
    mean = np.mean(np.array(taus), axis=0)
    close(run(ms, [0.0, 0.0], taus)[0], 3 / 8 * mean)
    base, taus = case((7, 6), n=3, seed=9)
    close(run(ms, base, taus)[0], ref_model_stock(base.double().numpy(), [t.double().numpy() for t in taus]), tol=1e-5)
    # filter_wise: the same per row
    merged = run(get_method("model_stock", filter_wise=True), base, taus)[0]
    rows = [ref_model_stock(base[i].double().numpy(), [t[i].double().numpy() for t in taus]) for i in range(7)]
    close(merged, np.stack(rows), tol=1e-5)
    with pytest.raises(MergeError, match="two or more fine-tunes"):
        ms.coefficients(None, 1)


# --------------------------------------------------------------------------- SCE


def ref_sce(base: np.ndarray, taus: list[np.ndarray], topk: float) -> np.ndarray:
    tv = np.stack([t.astype(np.float64) for t in taus])
    if topk < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        tv = tv * keep.reshape(var.shape)
    w = np.array([np.mean(t ** 2) for t in tv])
    w = w / w.sum() if abs(w.sum()) >= 1e-6 else np.ones_like(w) / len(w)
    sign = np.where(tv.sum(axis=0) >= 0, 1.0, -1.0)
    m = (np.sign(tv) == sign).astype(np.float64)
    ew = w.reshape(-1, *[1] * (tv.ndim - 1)) * m
    return base + (tv * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)


def test_sce_hand_values_and_reference():
    # τ1 = [2, −1, 0], τ2 = [1, 3, −2]: mean squares 5/3 and 14/3 → w = [5/19, 14/19];
    # Σ = [3, 2, −2] elects [+, +, −]: [(2·5 + 1·14)/19 ÷ 1, 3 (τ2 alone), −2 (τ2 alone; τ1's 0 never agrees)]
    close(run(get_method("sce"), [1.0, 1.0, 1.0], [[2.0, -1.0, 0.0], [1.0, 3.0, -2.0]])[0],
          [1 + 24 / 19, 1 + 3.0, 1 - 2.0])
    close(sce_weights([torch.zeros(3), torch.zeros(3)]), [0.5, 0.5])  # all ~0: uniform
    base, taus = case((10, 6), n=3, seed=13)
    for topk in (1.0, 0.5, 0.2):
        merged = run(get_method("sce", select_topk=topk), base, taus)[0]
        close(merged, ref_sce(base.double().numpy(), [t.double().numpy() for t in taus], topk), tol=1e-5)


def test_new_methods_are_registered_and_rebuild_from_their_params():
    for name, params in (("breadcrumbs", {"density": 0.9, "gamma": [0.01, 0.02]}),
                         ("breadcrumbs_ties", {"density": 0.9}), ("della", {"density": 0.4, "epsilon": 0.1}),
                         ("della_linear", {"density": 0.4}), ("slerp", {"t": [0, 1]}),
                         ("model_stock", {"filter_wise": True}), ("sce", {"select_topk": 0.3})):
        m = get_method(name, **params)
        assert m.name == name
        again = get_method(name, **m.params())
        assert again.params() == m.params()
    assert get_method("della").uses_seed and not get_method("breadcrumbs").uses_seed
    assert get_method("breadcrumbs").params()["gamma"] == 0.01 and get_method("della").params()["epsilon"] == 0.15
