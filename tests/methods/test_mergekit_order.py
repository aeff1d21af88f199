"""mergekit's arithmetic (`methods/mergekit_order.py`): mergekit recipes in bfloat16/float16 give mergekit's bytes.

- Stored digests of mergekit 0.1.5's outputs (recorded with `bench/mergekit_agreement.py`'s recipes on
  its fixture, a seeded tiny LLaMA family) must equal the digests of ours, for every deterministic
  method we share, with `dtype: bfloat16` and `dtype: float16`.
- A hand computation, element by element with a rounding after each step, pins the order on values
  where the order decides the result (and where our float64 sums give another answer).
- A bf16 dare_ties with `int8_mask` (random: statistically, against mergekit's seed-to-seed spread).
- `--arithmetic own` turns it off; the summary and the card say which arithmetic ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.methods import get_method, mergekit_order
from hf_metagpt.methods.base import TensorContext
from helpers import digest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from mergekit_agreement import RECIPES, load  # noqa: E402

#: sha256 (first 16 hex digits) of the fixture's inputs and of mergekit 0.1.5's outputs
#: (`mergekit-yaml` with `dtype: <fixture dtype>`, on CPU), recorded 2026-12-04 with torch 2.13.
INPUTS = {"bfloat16": "3678f81c402f3dd8", "float16": "5511155c542cb9eb"}
MERGEKIT = {
    ("linear", "bfloat16"): "b0195481c477fb7a",
    ("task_arithmetic", "bfloat16"): "8586f51fa31d0623",
    ("ties w=1", "bfloat16"): "7d97e747df64d91c",
    ("ties .5/.3/.2", "bfloat16"): "616e4c93acf14f15",
    ("ties all .5", "bfloat16"): "7d97e747df64d91c",
    ("ties gradient+filter", "bfloat16"): "719415f252f8e499",
    ("breadcrumbs", "bfloat16"): "65cc35f7ca5dbfeb",
    ("breadcrumbs_ties", "bfloat16"): "4cb9da6c22c84f22",
    ("slerp", "bfloat16"): "efb77661a791ec29",
    ("model_stock", "bfloat16"): "5cef18bdfb8a6a7c",
    ("model_stock filter_wise", "bfloat16"): "fe6c99f9176ef8ff",
    ("sce", "bfloat16"): "25af7e81138efe5d",
    ("linear", "float16"): "909cc68ea9870b08",
    ("task_arithmetic", "float16"): "dd548c86544b45ac",
    ("ties w=1", "float16"): "f34c3e5018e68669",
    ("ties .5/.3/.2", "float16"): "93c8632168c65bf2",
    ("ties all .5", "float16"): "f34c3e5018e68669",
    ("ties gradient+filter", "float16"): "2b23947fcce81ee0",
    ("breadcrumbs", "float16"): "e123357372560549",
    ("breadcrumbs_ties", "float16"): "2c9e6ca8f31af1b9",
    ("slerp", "float16"): "6feeae28742df4af",
    ("model_stock", "float16"): "c84a9a12ecde08fa",
    ("model_stock filter_wise", "float16"): "5c3f57da5a8006c8",
    ("sce", "float16"): "ac0a5760ff5ca6f2",
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkorder")
    out = {}
    for dtype in INPUTS:
        base, fts = build_family(root / dtype, n_models=3, spec=TinySpec(dtype=getattr(torch, dtype)), seed=3)
        state = {f"{m.name}/{k}": v for m in (base, *fts) for k, v in load(m).items()}
        out[dtype] = (base, fts, digest(state))
    return out


@pytest.mark.parametrize("name,dtype", sorted(MERGEKIT))
def test_mergekit_recipes_in_half_precision_give_mergekit_bytes(families, tmp_path, name, dtype):
    base, fts, inputs = families[dtype]
    if inputs != INPUTS[dtype]:
        pytest.skip("this torch builds other tiny models than the ones mergekit's digests were recorded on")
    body, _ = RECIPES[name]
    recipe = tmp_path / "r.yml"
    recipe.write_text(body.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2]) + f"dtype: {dtype}\n")
    result = hf_metagpt.merge(recipe=str(recipe), output=str(tmp_path / "out"), device="cpu")
    assert result.precision == f"mergekit {dtype}"
    assert digest(load(tmp_path / "out")) == MERGEKIT[(name, dtype)]


def _bf16(x: float) -> float:
    """x (a float32 value) rounded to the nearest bfloat16, ties to even."""
    return float(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16))


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def test_ties_in_bfloat16_rounds_each_step_as_written_by_hand():
    """TIES, two models, weights 0.3/0.7 (bf16: 0.30078125, 0.69921875), density 1, normalize, λ 1.5:
    τ = θt ⊖ θ0, ω = τ ⊙ w, elected sign of ω1 + ω2, δ = Σ agreeing ω (float32, rounded once),
    D = Σ agreeing w, δ ⊘ D, ⊙ λ, θ0 ⊕ — each step computed here by hand, one element at a time,
    on 3000 random bf16 values."""
    g = torch.Generator().manual_seed(5)
    b0 = torch.randn(3000, generator=g).to(torch.bfloat16)
    base = b0.float().tolist()
    ft1 = (b0.float() + 0.01 * torch.randn(3000, generator=g)).to(torch.bfloat16).float().tolist()
    ft2 = (b0.float() + 0.01 * torch.randn(3000, generator=g)).to(torch.bfloat16).float().tolist()
    w = [_bf16(0.3), _bf16(0.7)]
    expected = []
    for b, a1, a2 in zip(base, ft1, ft2):
        taus = [_bf16(a1 - b), _bf16(a2 - b)]
        om = [_bf16(t * x) for t, x in zip(taus, w)]
        elected = 1.0 if _bf16(_f32(om[0] + om[1])) >= 0 else -1.0
        agree = [o != 0 and (o > 0) == (elected > 0) for o in om]
        delta = _bf16(sum(o for o, k in zip(om, agree) if k))
        div = _bf16(sum(x for x, k in zip(w, agree) if k)) or 1.0
        delta = _bf16(_bf16(delta / div) * 1.5)
        expected.append(_bf16(b + delta))
    m = get_method("ties", weights=[0.3, 0.7], density=1.0, lambda_=1.5, mergekit_order="bfloat16")
    t = lambda v: torch.tensor(v, dtype=torch.bfloat16)  # noqa: E731
    got = mergekit_order.merge(m, t(base), [t(ft1), t(ft2)], TensorContext.of("x"))
    assert got.dtype == torch.bfloat16
    assert got.float().tolist() == expected
    # our own arithmetic (float32 steps on the exact weights) gives other bits on these values
    own = get_method("ties", weights=[0.3, 0.7], density=1.0, lambda_=1.5)
    b32 = t(base).float()
    taus = own.transform([t(ft1).float() - b32, t(ft2).float() - b32], TensorContext.of("x"))
    ours = own.combine(b32.clone(), taus, own.coefficients(None, 2), TensorContext.of("x")).to(torch.bfloat16)
    assert ours.float().tolist() != expected
    assert sum(a != b for a, b in zip(ours.float().tolist(), expected)) > 30


def test_linear_is_float32_whatever_the_dtype_and_task_arithmetic_is_not():
    """mergekit's linear promotes to float32 (its weights are a float32 tensor): a bf16 linear merge
    equals the float32 steps rounded once; task arithmetic rounds its weighted terms in bf16."""
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(4096, generator=g).to(torch.bfloat16) for _ in range(3)]
    lin = get_method("linear", weights=[0.5, 0.3, 0.2], mergekit_order="bfloat16")
    got = mergekit_order.merge(lin, ms[0], ms, TensorContext.of("x")).to(torch.bfloat16)
    f = [m.float() for m in ms]
    by_hand = ((f[0] * 0.5).add(f[1], alpha=0.3).add(f[2], alpha=0.2) / torch.tensor(1.0)).to(torch.bfloat16)
    assert torch.equal(got, by_hand)
    ta = get_method("task_arithmetic", weights=[0.5, 0.3], mergekit_order="bfloat16")
    out = mergekit_order.merge(ta, ms[0], ms[1:], TensorContext.of("x"))
    w = torch.tensor([0.5, 0.3], dtype=torch.bfloat16)
    terms = [(m - ms[0]) * x for m, x in zip(ms[1:], w)]
    assert torch.equal(out, ms[0] + (terms[0].float() + terms[1].float()).to(torch.bfloat16))


#: mergekit 0.1.5, the bf16 dare_ties + int8_mask recipe below on the bf16 fixture, four seeds
#: (`--random-seed 1..4`): the spread ‖θ − θ0‖ of the merged model and its share of changed elements.
MERGEKIT_DARE = {"spread": [5.027136, 5.031677, 5.029023, 5.024928], "changed": [0.87123, 0.87184, 0.87246, 0.87217]}


def test_bf16_dare_ties_with_int8_mask_matches_mergekit_statistically(families, tmp_path):
    base, fts, inputs = families["bfloat16"]
    body, _ = RECIPES["dare_ties"]
    recipe = tmp_path / "dare.yml"
    text = body.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2])
    recipe.write_text(text.replace("{density: 0.5}", "{density: 0.5, int8_mask: true}") + "dtype: bfloat16\n")
    assert "int8_mask: true" in recipe.read_text()
    out = tmp_path / "out"
    result = hf_metagpt.merge(recipe=str(recipe), output=str(out), device="cpu", seed=7)
    assert result.precision == "mergekit bfloat16"
    b, merged = load(base), load(out)
    states = [load(f) for f in fts]
    sq = 0.0
    changed = n = 0
    sq_ref = 0.0
    for name, v0 in b.items():
        d = merged[name].double() - v0.double()
        sq += float((d * d).sum())
        changed += int((d != 0).sum())
        n += d.numel()
        # the density-1 reference (every entry kept) by hand: E[DARE] keeps each τ in expectation
        taus = [s[name].double() - v0.double() for s in states]
        ref = 0.5 * taus[0] + 0.3 * taus[1] + 0.2 * taus[2]
        sq_ref += float((ref * ref).sum())
    if inputs == INPUTS["bfloat16"]:
        # within mergekit's own seed-to-seed range, widened by that range on each side
        for key, value in (("spread", sq ** 0.5), ("changed", changed / n)):
            lo, hi = min(MERGEKIT_DARE[key]), max(MERGEKIT_DARE[key])
            assert lo - (hi - lo) <= value <= hi + (hi - lo), (key, value, lo, hi)
    # with three models at density 0.5, an element is untouched only when all three drop it (1/8)
    # or the survivors' weighted sum rounds to nothing: about 7/8 change
    assert 0.84 < changed / n < 0.90
    # dropping half and rescaling by ‖τ‖₁ inflates the spread over the density-1 merge (√2 for one model)
    assert 1.0 < (sq / sq_ref) ** 0.5 < 1.6


@pytest.mark.slow
def test_cli_says_which_arithmetic_ran_and_arithmetic_own_turns_it_off(families, tmp_path):
    base, fts, _ = families["bfloat16"]
    body, _ = RECIPES["ties .5/.3/.2"]
    recipe = tmp_path / "ties.yml"
    recipe.write_text(body.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2]) + "dtype: bfloat16\n")
    runs = {}
    for mode in ("auto", "own"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "--output", str(out),
               "--device", "cpu", "--arithmetic", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = (proc.stdout, (out / "README.md").read_text(), load(out),
                      json.loads((out / "metagpt_coefficients.json").read_text()))
    stdout, card, state, coef = runs["auto"]
    assert "Arithmetic: mergekit's, in bfloat16" in stdout
    assert "merged with mergekit's arithmetic (mergekit 0.1.5's steps in bfloat16" in card
    assert coef["precision"] == "mergekit bfloat16" and coef["parameters"]["mergekit_order"] == "bfloat16"
    assert digest(state) == MERGEKIT[("ties .5/.3/.2", "bfloat16")] or families["bfloat16"][2] != INPUTS["bfloat16"]
    stdout, card, own, coef = runs["own"]
    assert "Arithmetic: mergekit's" not in stdout and "mergekit's arithmetic" not in card
    assert coef["precision"] == "float32" and "mergekit_order" not in coef["parameters"]
    assert digest(own) != digest(state)


def test_arithmetic_mergekit_needs_a_method_mergekit_has(tmp_path):
    from hf_metagpt.errors import RecipeError
    from hf_metagpt.options import MergeOptions, method_parameters

    opts = MergeOptions(base="b", models=["m"], output="o", method="metagpt", arithmetic="mergekit")
    with pytest.raises(RecipeError, match="mergekit has no method 'metagpt'"):
        method_parameters(opts)
    opts = MergeOptions(base="b", models=["m"], output="o", method="ties", arithmetic="mergekit", dtype="float16")
    assert method_parameters(opts)["mergekit_order"] == "float16"
    with pytest.raises(hf_metagpt.errors.MergeError, match="mergekit_order must be false, auto or one of"):
        get_method("ties", mergekit_order="float64")
