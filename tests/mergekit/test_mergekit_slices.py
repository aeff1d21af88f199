"""mergekit `slices:` recipes: layer ranges, several slices, layer stacking (passthrough).

References are independent: a passthrough output must hold the very bytes of the input layer each
output layer names; a sliced task arithmetic is recomputed here in float64 from the input layers
each output layer reads. The same recipes were run through mergekit 0.1.5 when this was written
(the tiny family below, seed 1): passthrough, per-slice task arithmetic and TIES gave mergekit's
bytes tensor for tensor (bench/mergekit_agreement.py measures it again).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import run_cli
from reference import assert_within_ulp, load_state

from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.errors import RecipeError
from hf_metagpt.mergekit_recipe import parse_mergekit


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    base, fts = build_family(root, n_models=2, spec=TinySpec(num_hidden_layers=4), seed=1)
    return base, fts


LAZY = """
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 4]
          - model: {b}
            layer_range: [0, 4]
    merge_method: slerp
    base_model: {a}
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
    dtype: bfloat16
"""


def test_lazymergekit_slerp_template_reads_as_models():
    """LazyMergekit's template (the Hub's most common recipe): one full-range slice is `models:`."""
    values = parse_mergekit(yml(LAZY.format(a="org/a", b="org/b")))
    values["parameters"].pop("mergekit_order", None)  # the arithmetic's choice: methods/mergekit_order.py
    assert values == {
        "method": "slerp", "base": "org/a", "models": ["org/b"], "dtype": "bfloat16",
        "layers": [[0, 1, 2, 3], [0, 1, 2, 3]],  # checked against the models' layer count by the plan
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    }


def test_lazymergekit_slerp_template_merges_as_the_models_recipe(family, tmp_path, capsys):
    base, (ft, _) = family
    sliced, plain = tmp_path / "sliced.yml", tmp_path / "plain.yml"
    sliced.write_text(yml(LAZY.format(a=base, b=ft)))
    text = yml(LAZY.format(a=base, b=ft))
    head = text.split("merge_method:")[0]
    plain.write_text(text.replace(head, f"models:\n  - model: {base}\n  - model: {ft}\n"))
    assert "layer_range" not in plain.read_text()
    outs = []
    for recipe in (sliced, plain):
        out = tmp_path / recipe.stem
        code, _, err = run_cli(["merge", "--recipe", str(recipe), "-o", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        outs.append(load_state(out))
    assert outs[0].keys() == outs[1].keys() == load_state(base).keys()
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name
    # a layer_range past the model's layers is refused before anything is read
    bad = tmp_path / "bad.yml"
    bad.write_text(sliced.read_text().replace("[0, 4]", "[0, 5]"))
    code, _, err = run_cli(["merge", "--recipe", str(bad), "-o", str(tmp_path / "bad"), "--device", "cpu"], capsys)
    assert code != 0 and "takes layer 4 of" in err and "which has 4 layers" in err
    assert not (tmp_path / "bad").exists()


def test_passthrough_frankenmerge_stacks_layers_with_their_bytes(family, tmp_path):
    """Layers 0-2 of one model then 1-3 of another: six layers, each the bytes of its source;
    embeddings from the first slice's model, final norm and head from the last one's (as mergekit)."""
    _, (a, b) = family
    recipe = tmp_path / "frank.yml"
    recipe.write_text(yml(f"""
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 3]
          - sources:
              - model: {b}
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: bfloat16
    """))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "-o", str(out),
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "6 output layers" in proc.stdout + proc.stderr
    sa, sb, got = load_state(a), load_state(b), load_state(out)
    source = {0: (sa, 0), 1: (sa, 1), 2: (sa, 2), 3: (sb, 1), 4: (sb, 2), 5: (sb, 3)}
    expected = {}
    for j, (state, k) in source.items():
        for name, t in state.items():
            if f"layers.{k}." in name:
                expected[name.replace(f"layers.{k}.", f"layers.{j}.")] = t
    expected["model.embed_tokens.weight"] = sa["model.embed_tokens.weight"]
    expected["model.norm.weight"] = sb["model.norm.weight"]
    expected["lm_head.weight"] = sb["lm_head.weight"]
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 128)


def test_slices_with_their_own_parameters_and_layer_ranges(family, tmp_path, capsys):
    """Two slices, a model read at other layers than the base, weights per source, per slice (a
    gradient within the slice) and λ for all: each output layer against float64 task arithmetic."""
    base, (a, b) = family
    recipe = tmp_path / "ta.yml"
    recipe.write_text(yml(f"""
        merge_method: task_arithmetic
        base_model: {base}
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 3]
              - model: {a}
                layer_range: [0, 3]
                parameters:
                  weight: [0.2, 0.8]
              - model: {b}
                layer_range: [1, 4]
                parameters:
                  weight: 0.5
          - sources:
              - model: {base}
                layer_range: [2, 4]
              - model: {a}
                layer_range: [2, 4]
                parameters:
                  weight: 0.3
              - model: {b}
                layer_range: [2, 4]
            parameters:
              weight: 0.7
        parameters:
          lambda: 0.9
        dtype: float32
        out_dtype: bfloat16
    """))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--recipe", str(recipe), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    s0, sa, sb, got = load_state(base), load_state(a), load_state(b), load_state(out)
    # output layer j: (base layer, a's layer, a's weight, b's layer, b's weight)
    rows = {0: (0, 0, 0.2, 1, 0.5), 1: (1, 1, 0.5, 2, 0.5), 2: (2, 2, 0.8, 3, 0.5),
            3: (2, 2, 0.3, 2, 0.7), 4: (3, 3, 0.3, 3, 0.7)}
    expected = {}
    for j, (k0, ka, wa, kb, wb) in rows.items():
        for name in s0:
            if f"layers.{k0}." not in name:
                continue
            out_name = name.replace(f"layers.{k0}.", f"layers.{j}.")
            v0 = s0[name].double()
            ta = sa[name.replace(f"layers.{k0}.", f"layers.{ka}.")].double() - v0
            tb = sb[name.replace(f"layers.{k0}.", f"layers.{kb}.")].double() - v0
            expected[out_name] = (v0 + 0.9 * (wa * ta + wb * tb), v0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        v0 = s0[name].double()
        wa, wb = (0.2, 0.5) if "embed" in name else (0.3, 0.7)  # first slice's start, last slice's start
        expected[name] = (v0 + 0.9 * (wa * (sa[name].double() - v0) + wb * (sb[name].double() - v0)), v0)
    assert got.keys() == expected.keys()
    for name, (e, v0) in expected.items():
        assert_within_ulp(got[name], e, torch.bfloat16, scale=v0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: slerp\nbase_model: a/b\nmodels: [a/b, a/c]\nslices:\n  - sources:\n      - model: a/b\n"
     "        layer_range: [0, 2]\n", "both `slices` and `models` (r.yml, line 4)"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n"
     "      - model: a/c\n        layer_range: [0, 3]\n", "cover different numbers of layers ([2, 3])"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: a/b\n        layer_range: [2, 2]\n",
     "layer_range must be [start, end] with 0 <= start < end, got [2, 2]"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n"
     "      - model: a/c\n        layer_range: [0, 2]\n  - sources:\n      - model: a/b\n        layer_range: [2, 4]\n",
     "This slice does not list 'a/c', which other slices merge"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n"
     "      - model: a/c\n        layer_range: [0, 2]\n", "passthrough copies each layer from one model"),
])
def test_bad_slices_name_the_problem_and_its_line(text, fragment):
    with pytest.raises(RecipeError) as info:
        parse_mergekit(text, "r.yml")
    assert fragment in str(info.value)
