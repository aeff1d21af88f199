"""Peer merge methods (linear, task arithmetic, TIES, DARE, MetaGPT+DARE/TIES) as pure tensor math.

Each method is checked against values worked out by hand and against an independent float64
reference written here with plain loops / numpy, driven the way the engine drives it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from hf_metagpt.errors import MergeError
from hf_metagpt.methods import (
    METHODS,
    MetaGPT,
    TaskArithmetic,
    TensorContext,
    get_method,
    metagpt_lambdas,
    squared_norm,
)
from hf_metagpt.methods import common


def run(method, base, thetas=None, *, taus=None, name="model.layers.0.mlp.up_proj.weight", seed=0):
    """One tensor through the engine's protocol: transform, (norms), coefficients, combine."""
    base = torch.as_tensor(base, dtype=torch.float32)
    if taus is None:
        taus = [torch.as_tensor(t, dtype=torch.float32) - base for t in thetas]
    taus = [torch.as_tensor(t, dtype=torch.float32) for t in taus]
    ctx = TensorContext(name, seed)
    transformed = method.transform(taus, ctx)
    sq = [squared_norm(t) for t in transformed] if method.uses_group_norms else None
    coeffs = method.coefficients(sq, len(taus))
    return method.combine(base.clone(), transformed, coeffs), transformed, coeffs


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------- independent references


def ref_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density·n) largest magnitudes (inputs here have no equal magnitudes)."""
    flat = tau.reshape(-1)
    k = int(density * flat.size)
    out = np.zeros_like(flat)
    order = sorted(range(flat.size), key=lambda j: -abs(flat[j]))
    for j in order[:k]:
        out[j] = flat[j]
    return out.reshape(tau.shape)


def ref_elect(taus: list[np.ndarray], method: str = "total") -> list[np.ndarray]:
    flats = [t.reshape(-1) for t in taus]
    kept = [np.zeros_like(f) for f in flats]
    for j in range(flats[0].size):
        if method == "total":
            s = sum(f[j] for f in flats)
        else:
            s = sum(np.sign(f[j]) for f in flats)
        elected = 1.0 if s >= 0 else -1.0
        for f, k in zip(flats, kept):
            if np.sign(f[j]) == elected:
                k[j] = f[j]
    return [k.reshape(taus[0].shape) for k in kept]


def ref_disjoint(kept: list[np.ndarray], coeffs) -> np.ndarray:
    flats = [k.reshape(-1) for k in kept]
    out = np.zeros_like(flats[0])
    for j in range(out.size):
        agree = [t for t in range(len(flats)) if flats[t][j] != 0]
        if agree:
            out[j] = sum(coeffs[t] * flats[t][j] for t in agree) / len(agree)
    return out.reshape(kept[0].shape)


def ref_elect_weighted(taus: list[np.ndarray], w, method: str = "total") -> list[np.ndarray]:
    """mergekit's TIES election: on wt·τt; an entry survives when sign(wt·τt) is the elected sign."""
    flats = [t.reshape(-1) for t in taus]
    kept = [np.zeros_like(f) for f in flats]
    for j in range(flats[0].size):
        votes = [w[t] * flats[t][j] for t in range(len(flats))]
        s = sum(votes) if method == "total" else sum(np.sign(v) for v in votes)
        elected = 1.0 if s >= 0 else -1.0
        for t, k in enumerate(kept):
            if np.sign(votes[t]) == elected:
                k[j] = flats[t][j]
    return [k.reshape(taus[0].shape) for k in kept]


def ref_weighted_mean(kept: list[np.ndarray], w, lam: float = 1.0, normalize: bool = True) -> np.ndarray:
    """λ Σ wt τ̃t / Σ{agreeing} wt per entry (a zero divisor counts as 1)."""
    flats = [k.reshape(-1) for k in kept]
    out = np.zeros_like(flats[0])
    for j in range(out.size):
        agree = [t for t in range(len(flats)) if flats[t][j] != 0]
        d = sum(w[t] for t in agree) if normalize else 1.0
        out[j] = lam * sum(w[t] * flats[t][j] for t in agree) / (d if d != 0 else 1.0)
    return out.reshape(kept[0].shape)


def ref_lambdas(taus: list[np.ndarray]) -> list[float]:
    sq = [float((t.astype(np.float64) ** 2).sum()) for t in taus]
    total = sum(sq)
    return [s / total if total else 0.0 for s in sq]


def random_case(shape=(6, 5), n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    thetas = [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]
    return base, thetas


# --------------------------------------------------------------------------- registry and parameters


def test_registry_names_and_recorded_params():
    assert {"metagpt", "linear", "task_arithmetic", "ties", "dare", "dare_linear", "dare_ties",
            "metagpt_dare", "metagpt_ties"} <= set(METHODS)
    assert get_method("dare").name == "dare_linear"
    assert get_method("ties").params() == {
        "density": 0.2, "majority_sign_method": "total", "weights": None, "lambda_": 1.0,
        "normalize": True, "rescale": False}
    # mergekit's per-method defaults of normalize and rescale
    assert [get_method(n).params()["normalize"] for n in ("task_arithmetic", "ties", "dare_ties", "dare_linear")] \
        == [False, True, False, False]
    assert [get_method(n).params()["rescale"] for n in ("ties", "dare_ties", "dare_linear")] == [False, True, True]
    assert get_method("dare_ties").params()["density"] == 0.5
    assert get_method("metagpt_dare", drop_rate=0.9).params() == {"density": 0.1}
    assert get_method("metagpt_ties", density=0.3).params() == {"density": 0.3, "majority_sign_method": "total"}
    assert get_method("task_arithmetic", scaling=0.3).params() == {"weights": None, "lambda_": 0.3, "normalize": False}
    assert get_method("task_arithmetic", **{"lambda": 2}).params()["lambda_"] == 2.0
    # seeded ones say so; the MetaGPT combinations ask for group norms
    assert [get_method(n).uses_seed for n in ("dare_linear", "dare_ties", "metagpt_dare")] == [True] * 3
    assert [get_method(n).uses_seed for n in ("linear", "task_arithmetic", "ties", "metagpt_ties")] == [False] * 4
    assert get_method("metagpt_dare").uses_group_norms and get_method("metagpt_ties").uses_group_norms
    assert not get_method("ties").uses_group_norms


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                  "metagpt_dare", "metagpt_ties"])
def test_recorded_params_rebuild_the_same_method(name):
    m = get_method(name, weights=[1, 2]) if name in ("linear", "task_arithmetic", "ties", "dare_linear",
                                                      "dare_ties") else get_method(name, density=0.4)
    again = get_method(name, **m.params())
    assert again == m and again.params() == m.params()


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("nope", {}, "Unknown merge method 'nope'"),
        ("ties", {"foo": 1}, "Unknown parameter 'foo' for method 'ties'"),
        ("ties", {"density": 0}, "density must be in (0, 1]"),
        ("dare_ties", {"density": 1.5}, "density must be in (0, 1]"),
        ("metagpt_dare", {"density": "half"}, "density must be a finite number"),
        ("metagpt_ties", {"density": float("nan")}, "density must be a finite number"),
        ("dare_linear", {"drop_rate": 1.0}, "drop_rate must be in [0, 1)"),
        ("dare_linear", {"density": 0.5, "drop_rate": 0.5}, "'density' and 'drop_rate' set the same parameter"),
        ("task_arithmetic", {"lambda_": 1, "scaling": 2}, "set the same parameter"),
        ("task_arithmetic", {"weights": "abc"}, "weights must be a list, one entry per fine-tune"),
        ("task_arithmetic", {"weights": [1, True]}, "weights must be a finite number"),
        ("ties", {"majority_sign_method": "vote"}, "majority_sign_method must be one of total, frequency"),
        ("linear", {"normalize": "yes"}, "normalize must be true or false"),
        ("metagpt_ties", {"lambda_": 0.5}, "Unknown parameter 'lambda_' for method 'metagpt_ties'"),
    ],
)
def test_bad_parameters_raise_a_clear_merge_error(name, params, fragment):
    with pytest.raises(MergeError) as info:
        get_method(name, **params)
    assert fragment in str(info.value)


def test_weight_count_and_zero_sum_are_checked_when_the_models_are_known():
    with pytest.raises(MergeError, match="2 weights given for 3 fine-tunes"):
        get_method("ties", weights=[1, 2]).coefficients(None, 3)
    with pytest.raises(MergeError, match="sum to 0"):
        get_method("linear", weights=[1, -1]).coefficients(None, 2)


# --------------------------------------------------------------------------- linear and task arithmetic


def test_linear_hand_values():
    base, thetas = [1.0, 1.0], [[2.0, 3.0], [4.0, 7.0]]
    close(run(get_method("linear"), base, thetas)[0], [3.0, 5.0])  # equal weights: plain mean
    close(run(get_method("linear", weights=[1, 3]), base, thetas)[0], [3.5, 6.0])  # (θ1 + 3θ2)/4
    # without normalization it is Σ wt θt (the base is not added back): [2+12, 3+21]
    close(run(get_method("linear", weights=[1, 3], normalize=False), base, thetas)[0], [14.0, 24.0])


def test_linear_matches_weighted_average_of_models():
    base, thetas = random_case()
    w = [0.2, 1.0, 3.0]
    merged = run(get_method("linear", weights=w), base, thetas)[0]
    expected = sum(wi * t.double().numpy() for wi, t in zip(w, thetas)) / sum(w)
    close(merged, expected)


def test_task_arithmetic_hand_values():
    base, taus = [1.0, 1.0], [[1.0, 2.0], [2.0, 5.0]]
    close(run(get_method("task_arithmetic"), base, taus=taus)[0], [4.0, 8.0])
    close(run(get_method("task_arithmetic", scaling=0.5), base, taus=taus)[0], [2.5, 4.5])
    close(run(get_method("task_arithmetic", weights=[1, -1]), base, taus=taus)[0], [0.0, -2.0])
    close(run(get_method("task_arithmetic", weights=[1, -1], lambda_=2), base, taus=taus)[0], [-1.0, -5.0])


def test_task_arithmetic_with_metagpt_lambdas_as_weights_equals_metagpt():
    base, thetas = random_case(n=3, seed=7)
    taus = [t - base for t in thetas]
    lambdas = metagpt_lambdas([squared_norm(t) for t in taus])
    close(lambdas, ref_lambdas([t.double().numpy() for t in taus]), tol=1e-12)
    ta = run(TaskArithmetic(weights=lambdas), base, taus=taus)[0]
    mg = run(MetaGPT(), base, taus=taus)[0]
    # the same formula; task arithmetic sums the weighted τ before adding θ0 (mergekit's order)
    close(ta, mg, tol=1e-6)


# --------------------------------------------------------------------------- TIES

# Three task vectors of five entries, density 0.6 → k = 3 kept per model:
#   τ1 = [ 4, -1,  3, 0.5, -2 ] → [ 4,  0, 3, 0, -2 ]
#   τ2 = [-3,  2, -1, 5,   0.1] → [-3,  2, 0, 5,  0 ]
#   τ3 = [ 1, -6, 0.2, -0.3, 7] → [ 1, -6, 0, 0,  7 ]
# sums [2, -4, 3, 5, 5] elect [+, −, +, +, +]; kept entries:
#   τ̃1 = [4, 0, 3, 0, 0], τ̃2 = [0, 0, 0, 5, 0], τ̃3 = [1, -6, 0, 0, 7]
HAND_TAUS = [[4.0, -1.0, 3.0, 0.5, -2.0], [-3.0, 2.0, -1.0, 5.0, 0.1], [1.0, -6.0, 0.2, -0.3, 7.0]]
HAND_KEPT = [[4.0, 0, 3.0, 0, 0], [0, 0, 0, 5.0, 0], [1.0, -6.0, 0, 0, 7.0]]


def test_ties_hand_values():
    merged, kept, coeffs = run(get_method("ties", density=0.6), [1.0] * 5, taus=HAND_TAUS)
    for k, e in zip(kept, HAND_KEPT):
        close(k, e, tol=0)
    assert coeffs == [1.0, 1.0, 1.0]
    # disjoint mean [(4+1)/2, -6, 3, 5, 7] on a base of ones
    close(merged, [3.5, -5.0, 4.0, 6.0, 8.0])
    # λ scales the mean
    close(run(get_method("ties", density=0.6, lambda_=0.5), [0.0] * 5, taus=HAND_TAUS)[0],
          [1.25, -3.0, 1.5, 2.5, 3.5])
    # weights [1, 1, 3] (mergekit's TIES): signs are elected on the weighted trimmed vectors,
    #   Σ wt τt = [4-3+3, 2-18, 3, 5, -2+21] = [4, -16, 3, 5, 19] → [+, −, +, +, +] (same kept entries),
    # and the divisor is the sum of the agreeing weights [1+3, 3, 1, 1, 3]:
    #   [(4 + 3·1)/4, 3·(-6)/3, 3/1, 5/1, 3·7/3]
    close(run(get_method("ties", density=0.6, weights=[1, 1, 3]), [0.0] * 5, taus=HAND_TAUS)[0],
          [7 / 4, -6.0, 3.0, 5.0, 7.0])
    # a negative weight votes against its model's sign: weights [1, 1, -1] turn τ3's +7 into -7: Σ = [4-3-1, 2+6, 3, 5, -2-7] = [0, 8, 3, 5, -9]
    #   → [+, +, +, +, −]: kept τ1 [4, 0, 3, 0, -2], τ2 [0, 2, 0, 5, 0], τ3 [0, -6, 0, 0, 7];
    #   divisors [1, 1-1, 1, 1, 1-1] (0 → 1): [4, 2 + 6, 3, 5, -2 - 7]
    close(run(get_method("ties", density=0.6, weights=[1, 1, -1]), [0.0] * 5, taus=HAND_TAUS)[0],
          [4.0, 8.0, 3.0, 5.0, -9.0])
    # normalize false sums the agreeing weighted entries
    close(run(get_method("ties", density=0.6, weights=[1, 1, 3], normalize=False), [0.0] * 5, taus=HAND_TAUS)[0],
          [7.0, -18.0, 3.0, 5.0, 21.0])


def test_metagpt_ties_hand_values():
    # ‖τ̃‖² = 16+9, 25, 1+36+49 → λ = [25, 25, 86] / 136
    merged, kept, coeffs = run(get_method("metagpt_ties", density=0.6), [1.0] * 5, taus=HAND_TAUS)
    close(coeffs, [25 / 136, 25 / 136, 86 / 136], tol=1e-12)
    close(merged, [1 + 186 / 136, 1 - 516 / 136, 1 + 75 / 136, 1 + 125 / 136, 1 + 602 / 136])


def test_ties_sign_election_tie_elects_positive():
    # every sum is exactly 0: + is elected, so the positive entries survive, alone
    merged, kept, _ = run(get_method("ties", density=1.0), [0.0] * 3, taus=[[1.0, -2.0, 0.0], [-1.0, 2.0, 0.0]])
    close(kept[0], [1.0, 0.0, 0.0], tol=0)
    close(kept[1], [0.0, 2.0, 0.0], tol=0)
    close(merged, [1.0, 2.0, 0.0], tol=0)
    # frequency: one vote each way → +
    close(run(get_method("ties", density=1.0, majority_sign_method="frequency"), [0.0], taus=[[3.0], [-1.0]])[0],
          [3.0], tol=0)


def test_ties_total_and_frequency_elect_differently():
    taus = [[-5.0], [1.0], [1.0]]
    close(run(get_method("ties", density=1.0), [0.0], taus=taus)[0], [-5.0], tol=0)  # Σ = -3
    close(run(get_method("ties", density=1.0, majority_sign_method="frequency"), [0.0], taus=taus)[0],
          [1.0], tol=0)  # two votes for +, mean of 1 and 1


@pytest.mark.parametrize("name", ["ties", "metagpt_ties", "dare_ties", "dare_linear", "metagpt_dare"])
def test_all_zero_task_vectors_give_the_base(name):
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    merged = run(get_method(name), base, taus=[torch.zeros(4, 3)] * 3)[0]
    assert torch.equal(merged, base)


@pytest.mark.parametrize("density", [0.1, 0.35, 0.8, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_reference(density, sign_method, monkeypatch):
    monkeypatch.setattr(common, "CHUNK", 7)  # slices that cut rows: same numbers as one slice
    base, thetas = random_case(shape=(6, 5), n=3, seed=11)
    taus64 = [(t - base).double().numpy() for t in thetas]
    w = [0.5, -2.0, 1.0]  # a negative weight: its model votes (and counts) with the opposite sign
    kept_w = ref_elect_weighted([ref_trim(t, density) for t in taus64], w, sign_method)
    merged, kept, _ = run(get_method("ties", density=density, majority_sign_method=sign_method, weights=w,
                                     lambda_=0.7), base, thetas)
    for k, r in zip(kept, kept_w):
        close(k, r)
    close(merged, base.double().numpy() + ref_weighted_mean(kept_w, w, 0.7))
    kept_ref = ref_elect([ref_trim(t, density) for t in taus64], sign_method)

    merged_mg, _, coeffs = run(get_method("metagpt_ties", density=density, majority_sign_method=sign_method),
                               base, thetas)
    lam = ref_lambdas(kept_ref)
    close(coeffs, lam, tol=1e-6)
    close(merged_mg, base.double().numpy() + sum(l * k for l, k in zip(lam, kept_ref)))


def test_ties_with_weights_one_equals_peft_ties_the_paper():
    # TIES with weights 1 is the paper's disjoint mean, which peft implements; with other weights
    # peft elects on unweighted vectors and divides by the count, mergekit (and we) do not.
    base, thetas = random_case(shape=(16, 9), n=3, seed=5)
    taus = [t - base for t in thetas]
    ours = run(get_method("ties", density=0.3), base, taus=taus)[0]
    peft = base + merge_utils.ties(taus, torch.ones(3), density=0.3)
    torch.testing.assert_close(ours, peft, rtol=1e-6, atol=1e-6)
    w = [1.0, 0.3, 2.0]
    ours_w = run(get_method("ties", density=0.3, weights=w), base, taus=taus)[0]
    peft_w = base + merge_utils.ties(taus, torch.tensor(w), density=0.3)
    assert not torch.allclose(ours_w, peft_w)


def test_ties_leaves_inputs_untouched_and_handles_transposed_tensors():
    base, thetas = random_case(shape=(5, 7), n=2, seed=2)
    taus = [(t - base).t() for t in thetas]  # non-contiguous views
    before = [t.clone() for t in taus]
    merged = run(get_method("ties", density=0.5), base.t(), taus=taus)[0]
    assert all(torch.equal(a, b) for a, b in zip(taus, before))
    kept = ref_elect([ref_trim(t.double().numpy(), 0.5) for t in before])
    close(merged, base.t().double().numpy() + ref_disjoint(kept, [1.0, 1.0]))


# --------------------------------------------------------------------------- DARE


def test_dare_keeps_about_density_and_rescales_survivors():
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    (out,) = get_method("dare_linear", density=0.3).transform([tau], TensorContext("w", 1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # mergekit's rescale: the survivors carry the whole ‖τ‖₁ (the paper's 1/density in expectation)
    scale = tau.double().abs().sum() / tau[kept].double().abs().sum()
    assert abs(scale.item() - 1 / 0.3) < 0.05
    torch.testing.assert_close(out[kept].double(), tau[kept].double() * scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double().abs().sum(), tau.double().abs().sum(), rtol=1e-5, atol=0)
    assert abs(out.sum().item() - tau.sum().item()) < 0.05 * tau.abs().sum().item()
    # rescale false keeps the survivors as they are
    (plain,) = get_method("dare_linear", density=0.3, rescale=False).transform([tau], TensorContext("w", 1))
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], tau[kept])


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "metagpt_dare"])
def test_dare_matches_reference_given_its_mask(name):
    base, thetas = random_case(shape=(8, 6), n=3, seed=4)
    taus = [t - base for t in thetas]
    taus64 = [t.double().numpy() for t in taus]
    ctx_name, seed, w = "model.layers.0.mlp.up_proj.weight", 9, [1.0, 2.0, 0.5]
    # The drop step alone (dare_linear's transform); its mask read back (no τ entry is 0 here).
    dropped = get_method("dare_linear", density=0.4).transform(taus, TensorContext(ctx_name, seed))
    masks = [(d != 0).numpy() for d in dropped]
    assert 0 < sum(m.sum() for m in masks) < sum(m.size for m in masks)
    dropped_ref = [np.where(m, t, 0.0) * (np.abs(t).sum() / np.abs(np.where(m, t, 0.0)).sum())
                   for m, t in zip(masks, taus64)]
    for d, r in zip(dropped, dropped_ref):
        close(d, r)
    params = {"density": 0.4} if name == "metagpt_dare" else {"density": 0.4, "weights": w}
    merged, out, coeffs = run(get_method(name, **params), base, taus=taus, name=ctx_name, seed=seed)
    if name == "dare_linear":
        expected = sum(c * d for c, d in zip(w, dropped_ref))
    elif name == "dare_ties":
        kept_ref = ref_elect_weighted(dropped_ref, w)
        for o, r in zip(out, kept_ref):
            close(o, r)
        expected = ref_weighted_mean(kept_ref, w, normalize=False)  # mergekit's default: no division
    else:
        # metagpt_dare keeps the paper's 1/density rescale
        dropped_ref = [np.where(m, t / 0.4, 0.0) for m, t in zip(masks, taus64)]
        lam = ref_lambdas(dropped_ref)
        close(coeffs, lam, tol=1e-6)
        expected = sum(l * d for l, d in zip(lam, dropped_ref))
    close(merged, base.double().numpy() + expected)


def test_dare_density_one_is_the_identity():
    base, thetas = random_case(seed=8)
    taus = [t - base for t in thetas]
    for params in ({"density": 1.0}, {"drop_rate": 0}):
        out = get_method("dare_linear", **params).transform(taus, TensorContext("w", 0))
        assert all(torch.equal(o, t) for o, t in zip(out, taus))  # nothing dropped
        assert torch.equal(run(get_method("dare_linear", **params), base, taus=taus)[0],
                           run(get_method("task_arithmetic"), base, taus=taus)[0])
        assert torch.equal(run(get_method("metagpt_dare", **params), base, taus=taus)[0],
                           run(MetaGPT(), base, taus=taus)[0])
    # dare_ties at density 1 is sign election + the sum of the agreeing entries (mergekit's
    # normalize false): Σ = [0, 0, 4] elects +, kept [1, 0, 3] and [0, 2, 1]
    close(run(get_method("dare_ties", density=1.0), [0.0] * 3, taus=[[1.0, -2.0, 3.0], [-1.0, 2.0, 1.0]])[0],
          [1.0, 2.0, 4.0], tol=0)
    # … and with normalize, their mean (the TIES paper's disjoint mean)
    close(run(get_method("dare_ties", density=1.0, normalize=True), [0.0] * 3,
              taus=[[1.0, -2.0, 3.0], [-1.0, 2.0, 1.0]])[0], [1.0, 2.0, 2.0], tol=0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "metagpt_dare"])
def test_dare_density_near_zero_drops_everything_and_gives_the_base(name):
    base, thetas = random_case(shape=(10, 10), seed=6)
    merged, out, coeffs = run(get_method(name, density=1e-12), base, thetas)
    assert all(torch.count_nonzero(o) == 0 for o in out)
    assert torch.isfinite(merged).all()
    assert torch.equal(merged, base)
    if name == "metagpt_dare":
        assert coeffs == [0.0, 0.0, 0.0]  # zero group: λ = 0, never NaN


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "metagpt_dare"])
def test_dare_is_deterministic_per_seed_and_tensor_name(name):
    base, thetas = random_case(shape=(32, 32), seed=12)
    taus = [t - base for t in thetas]
    before = [t.clone() for t in taus]
    method = get_method(name, density=0.5)
    a = method.transform(taus, TensorContext("model.layers.1.self_attn.q_proj.weight", 42))
    b = method.transform(taus, TensorContext("model.layers.1.self_attn.q_proj.weight", 42))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(t, u) for t, u in zip(taus, before))  # inputs untouched
    other_name = method.transform(taus, TensorContext("model.layers.1.self_attn.k_proj.weight", 42))
    other_seed = method.transform(taus, TensorContext("model.layers.1.self_attn.q_proj.weight", 43))
    assert not torch.equal((a[0] != 0), (other_name[0] != 0))
    assert not torch.equal((a[0] != 0), (other_seed[0] != 0))
    # each model gets its own mask
    dl = get_method("dare_linear", density=0.5).transform(taus, TensorContext("x", 42))
    assert not torch.equal(dl[0] != 0, dl[1] != 0)
    # whole merge, twice (the engine's two passes): identical
    m1 = run(method, base, thetas, name="n", seed=5)[0]
    m2 = run(method, base, thetas, name="n", seed=5)[0]
    assert torch.equal(m1, m2)


def test_dare_mask_follows_logical_order_not_strides():
    tau = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    method = get_method("dare_linear", density=0.5)
    ctx = TensorContext("w", 3)
    (from_transposed,) = method.transform([tau.t().contiguous().t()], ctx)
    (from_contiguous,) = method.transform([tau], ctx)
    assert torch.equal(from_transposed, from_contiguous)
