"""mergekit's recipe format in `--recipe`: translation, errors with their line, and whole merges.

The merges are checked against float64 references written here (SLERP's and task arithmetic's
published formulas, with mergekit's layer interpolation of `t` and `weight`); mergekit itself is
never needed (bench/mergekit_agreement.py measures against it).
"""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import torch
from helpers import run_cli
from reference import assert_within_ulp, load_state

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.errors import RecipeError
from hf_metagpt.mergekit_recipe import parse_mergekit
from hf_metagpt.options import build_options, parse_recipe


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip()


FULL = yml("""
    merge_method: ties
    base_model: org/base
    models:
      - model: org/base
      - model: org/a
        parameters:
          weight: 0.5
          density: [0.2, 0.8]
      - model: org/base+org/lora
        parameters:
          weight:
            - filter: self_attn
              value: 0.7
          density: 0.5
    parameters:
      weight: 0.3
      lambda: 0.9
    dtype: float32
    out_dtype: bfloat16
    tokenizer_source: org/a
""")


def test_a_full_recipe_becomes_our_options():
    values = parse_recipe(FULL, "mk.yml")  # detected by its merge_method key
    assert values == {
        "method": "ties", "base": "org/base", "models": ["org/a", "org/lora"],
        "parameters": {
            # per-model weights; a filtered one falls back to the method-wide weight
            "weights": [0.5, [{"filter": "self_attn", "value": 0.7}, {"value": 0.3}]],
            "lambda": 0.9,
            "density": 1.0,  # mergekit's default density, not our TIES default
            "per_model": [{"density": [0.2, 0.8]}, {"density": 0.5}],
            "mergekit_order": "float32",  # mergekit computes in `dtype`: its steps in float32
        },
        "dtype": "bfloat16",  # out_dtype wins: what is written
        "tokenizer_source": "org/a",
        "vocabulary": "tokenizer",  # mergekit's meaning: the rows are the tokenizer's tokens
    }
    opts = build_options(None, **values, output="out")
    m = hf_metagpt.methods.get_method(opts.method, **opts.parameters)
    assert m.normalize is True and m.lambda_ == 0.9  # ties normalizes by default, as in mergekit


def test_linear_slerp_and_metagpt_recipes():
    lin = parse_mergekit(yml("""
        merge_method: linear
        models:
          - model: m/one
            parameters: {weight: 2}
          - model: m/two
            parameters: {weight: 1}
        parameters: {normalize: false}
    """))
    # linear averages every listed model; without base_model the first is θ0 (and an input too)
    assert lin == {"method": "linear", "base": "m/one", "models": ["m/one", "m/two"],
                   "parameters": {"weights": [2, 1], "normalize": False, "mergekit_order": "auto"}}
    sl = parse_mergekit(yml("""
        merge_method: slerp
        base_model: m/base
        models:
          - model: m/base
          - model: m/other
        parameters:
          t: [0, 0.5, 1]
    """))
    assert sl == {"method": "slerp", "base": "m/base", "models": ["m/other"],
                  "parameters": {"t": [0, 0.5, 1], "mergekit_order": "auto"}}  # no dtype: the inputs'

    mg = parse_mergekit(yml("""
        merge_method: metagpt
        base_model: m/base
        models: [m/a, m/b]
        parameters: {granularity: layer}
    """))
    assert mg == {"method": "metagpt", "base": "m/base", "models": ["m/a", "m/b"], "granularity": "layer"}
    # --recipe-format hf-metagpt reads merge_method as one of our keys, which it is not
    with pytest.raises(RecipeError, match="Unknown recipe key 'merge_method'"):
        parse_recipe("merge_method: ties\n", "r.yml", "hf-metagpt")


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: ties\nbase_model: a/b\nmodules:\n  vision_tower: {models: [a/c]}\n",
     "mergekit `modules` ['vision_tower'] (a merge per module of a multi-module model) is not supported (r.yml, line 3)"),
    ("merge_method: ties\nbase_model: a/b\nmodels:\n  - model: a/c\n    parameters:\n      density: 0.5\n",
     "Model 'a/c' has no weight (r.yml, line 4)"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [a/c]\nparameters:\n  density: 1.5\n",
     "density must be in (0, 1], got 1.5 (r.yml, line 5)"),
    ("merge_method: slerp\nbase_model: a/b\nmodels: [a/b, a/c]\nparameters:\n  t:\n    - filter: mlp\n      valu: 1\n",
     "A filtered value of 't' must have `filter` and `value`, got ['filter', 'valu'] (r.yml, line 6)"),
    ("slices:\n  - sources: []\nmerge_method: passthrough\n", "`sources` must be a non-empty list of `- model: ...` entries (r.yml, line 2)"),
    ("merge_method: passthrough\nmodels: [a/b]\n", "merge_method 'passthrough' is not supported: passthrough stacks layers"),
    ("merge_method: multislerp\nmodels: [a/b]\n", "merge_method 'multislerp' is not supported: mergekit would interpolate"),
    ("merge_method: arcee_fusion\nbase_model: a/b\nmodels: [a/b, a/c, a/d]\n", "arcee_fusion merges exactly two models: base_model and one other (r.yml, line 3)"),
    ("merge_method: nuslerp\nmodels: [a/b]\n", "nuslerp merges exactly two models (and, optionally, a base_model whose task vectors they give) (r.yml, line 2)"),
    ("merge_method: ties\nmodels: [a/b, a/c]\n", "merge_method 'ties' needs a base_model"),
    ("merge_method: slerp\nbase_model: a/b\nmodels: [a/b, a/c, a/d]\n", "slerp merges exactly two models"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [a/b, a/c]\nparameters: {weight: 1}\ntokenizer:\n  source: union\n"
     "  pad_to_multiple_of: 64\n", "tokenizer.pad_to_multiple_of is not supported (r.yml, line 7)"),
    ("merge_method: ties\nbase_model: a/b\nmodels:\n  - model: a/x+\n    parameters: {weight: 1}\n",
     "Model 'a/x+' has an empty LoRA part after '+' (r.yml, line 4)"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [a/c]\nparameters: {weight: 1}\ndtype: int8\n", "dtype 'int8' is not supported (r.yml, line 5)"),
])
def test_bad_recipes_name_the_problem_and_its_line(text, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yml")
    assert fragment in str(info.value)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkfamily")
    base, fts = build_family(root, n_models=2, seed=4)
    return base, fts


def layer_x(name: str, n: int = 4) -> float | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) / (n - 1) if m else None


def interp(values: list[float], x: float) -> float:
    s = x * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (s - i0)) * values[i0] + (s - i0) * values[i1]


def test_cli_runs_a_mergekit_slerp_recipe_with_t_per_layer_and_filter(family, tmp_path, capsys):
    base, (ft, _) = family
    recipe = tmp_path / "slerp.yml"
    recipe.write_text(yml(f"""
        merge_method: slerp
        base_model: {base}
        models:
          - model: {base}
          - model: {ft}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 1]
            - value: 0.3
        dtype: bfloat16
    """))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--recipe", str(recipe), "--output", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    b, f, actual = load_state(base), load_state(ft), load_state(out)
    assert sorted(actual) == sorted(b)
    for name, v0 in b.items():
        x = layer_x(name)
        t = interp([0, 0.5, 1], x) if "self_attn" in name and x is not None else 0.3
        a, c = v0.double().reshape(-1), f[name].double().reshape(-1)
        dot = float((a / a.norm()) @ (c / c.norm()))
        if abs(dot) > 0.9995:
            e = (1 - t) * a + t * c
        else:
            om = math.acos(dot)
            e = (math.sin((1 - t) * om) * a + math.sin(t * om) * c) / math.sin(om)
        scale = torch.maximum(a.abs(), c.abs()).reshape(v0.shape)
        assert_within_ulp(actual[name], e.reshape(v0.shape), torch.bfloat16, scale=scale)
    recorded = json.loads((out / "metagpt_coefficients.json").read_text())
    assert recorded["method"] == "slerp"
    # the card gives the same merge as a mergekit recipe, which reads back to the same options
    # (local inputs by their folder name: a published card holds no local path)
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(base) not in card
    mk_text = card.split("The same merge as a mergekit recipe")[1].split("```yaml\n")[1].split("```")[0]
    again = parse_mergekit(mk_text)
    assert again == {"method": "slerp", "base": base.name, "models": [ft.name], "dtype": "bfloat16",
                     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}],
                                    "mergekit_order": "bfloat16"}}


def test_mergekit_task_arithmetic_with_weight_gradients_takes_the_fused_path(family, tmp_path):
    base, fts = family
    recipe = tmp_path / "ta.yml"
    recipe.write_text(yml(f"""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {base}
          - model: {fts[0]}
            parameters:
              weight: [1, 0]
          - model: {fts[1]}
            parameters:
              weight:
                - filter: mlp
                  value: 2
                - value: 0.5
        parameters:
          lambda: 0.8
    """))
    out = tmp_path / "out"
    result = hf_metagpt.merge(recipe=str(recipe), output=str(out), device="cpu", arithmetic="own")
    assert result.precision == "float64"  # --arithmetic own: the fused float64 kernel, not mergekit's steps
    card = (out / "README.md").read_text()
    mk_text = card.split("The same merge as a mergekit recipe")[1].split("```yaml\n")[1].split("```")[0]
    # (our own float64 sums: the card's mergekit recipe says `dtype: float32`, the closest mergekit comes)
    assert parse_mergekit(mk_text)["parameters"] == {
        "weights": [[1, 0], [{"filter": "mlp", "value": 2}, {"value": 0.5}]], "lambda": 0.8, "normalize": False,
        "mergekit_order": "float32"}
    b, f1, f2, actual = load_state(base), load_state(fts[0]), load_state(fts[1]), load_state(out)
    for name, v0 in b.items():
        x = layer_x(name)
        w1 = interp([1, 0], x if x is not None else 0.0)
        w2 = 2.0 if "mlp" in name else 0.5
        e = v0.double() + 0.8 * (w1 * (f1[name].double() - v0.double()) + w2 * (f2[name].double() - v0.double()))
        scale = torch.stack([v0.double().abs(), f1[name].double().abs(), f2[name].double().abs()]).amax(0)
        assert_within_ulp(actual[name], e, torch.bfloat16, scale=scale)


def test_mergekit_model_plus_lora_goes_through_our_lora_path(tmp_path):
    from test_lora import SPEC, make_adapter, materialize64

    base, (full,) = build_family(tmp_path / "fam", n_models=1, spec=SPEC, seed=6)
    adapter = make_adapter(base, tmp_path / "adapter", seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    recipe = tmp_path / "lora.yml"
    recipe.write_text(yml(f"""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {base}+{adapter}
            parameters: {{weight: 0.5}}
          - model: {full}
            parameters: {{weight: 0.3}}
        dtype: float32
    """))
    out = tmp_path / "out"
    result = hf_metagpt.merge(recipe=str(recipe), output=str(out), device="cpu")
    assert result.models[0].is_adapter and not result.models[1].is_adapter
    b, a, f, actual = load_state(base), materialize64(base, adapter), load_state(full), load_state(out)
    for name, v0 in b.items():
        e = v0.double() + 0.5 * (a[name].double() - v0.double()) + 0.3 * (f[name].double() - v0.double())
        scale = torch.stack([v0.double().abs(), a[name].double().abs(), f[name].double().abs()]).amax(0)
        # float32 steps, each within half an ulp of the inputs' size: τ, s·B·A, two products, their
        # sum, the sum's division-free add to θ0 (mergekit's order) → at most 6 ulps
        assert_within_ulp(actual[name], e, torch.float32, ulps=6, scale=scale)
    # the card's mergekit recipe names the adapter on the base again (by folder names: no local path)
    card = (out / "README.md").read_text()
    assert f"model: {base.name}+{adapter.name}" in card and str(tmp_path) not in card


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_mergekit_float32_recipes_take_mergekit_steps_bit_for_bit(tmp_path, method):
    """With `dtype: float32` mergekit rounds every float32 step; our fused kernels would sum in float64.
    A mergekit recipe gets mergekit's steps: the output equals them bit for bit on float32 models."""
    base, fts = build_family(tmp_path / "fam32", n_models=3, spec=TinySpec(dtype=torch.float32), seed=11)
    w = [0.5, 0.3, 0.2]
    entries = "\n".join(f"          - model: {f}\n            parameters: {{weight: {x}}}" for f, x in zip(fts, w))
    head = f"        base_model: {base}\n" if method == "task_arithmetic" else ""
    extra = "        parameters: {lambda: 0.9}\n" if method == "task_arithmetic" else ""
    recipe = tmp_path / "r.yml"
    recipe.write_text(yml(f"""
        merge_method: {method}
{head}        models:
{entries}
{extra}        dtype: float32
    """))
    assert parse_mergekit(recipe.read_text())["parameters"]["mergekit_order"] == "float32"
    out = tmp_path / "out"
    hf_metagpt.merge(recipe=str(recipe), output=str(out), device="cpu")
    b, states, actual = load_state(base), [load_state(f) for f in fts], load_state(out)
    weights = torch.tensor(w, dtype=torch.float32)
    differs = 0
    for name, v0 in b.items():
        if method == "linear":  # mergekit (measured): w1·θ1, + wt·θt fused per step, ÷ Σw, in float32
            e = states[0][name].float() * w[0]
            for s, x in zip(states[1:], w[1:]):
                e = torch.addcmul(e, s[name].float(), torch.tensor(x, dtype=torch.float32))
            e = e / weights.sum()
        else:  # mergekit: θ0 + λ · Σ wt (θt − θ0), each product and sum in float32, in order
            mixed = None
            for wt, s in zip(weights, states):
                term = (s[name].float() - v0.float()) * wt
                mixed = term if mixed is None else mixed + term
            e = v0.float() + mixed * 0.9
        assert torch.equal(actual[name], e), name
        differs += int((e.double() != _float64_merge(method, v0, [s[name] for s in states], w)).sum())
    assert differs > 0  # the float64 sum would have given other bits: the steps matter here


def _float64_merge(method, v0, thetas, w):
    if method == "linear":
        return (sum(x * t.double() for x, t in zip(w, thetas)) / sum(w)).float().double()
    return (v0.double() + 0.9 * sum(x * (t.double() - v0.double()) for x, t in zip(w, thetas))).float().double()
