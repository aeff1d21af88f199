"""What published mergekit recipes write that mergekit 0.1.5 runs: `pattern:` entries, a slerp base
outside `models`, `modules: {default: ...}`, and the sliced forms mergekit treats differently.

The digests are mergekit 0.1.5's outputs of each recipe on the bf16 tiny family of
tests/methods/test_mergekit_order.py (recorded 2026-12-04 by running mergekit-yaml on it); each case
also has an equivalence mergekit showed on the same family (e.g. the recipe with `pattern:` gives the
bytes of the recipe with the plain value), asserted here on our outputs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import hf_metagpt
from hf_metagpt.errors import RecipeError
from hf_metagpt.mergekit_recipe import parse_mergekit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from test_mergekit_order import INPUTS, digest, families, load  # noqa: E402,F401  (fixture reused)

#: name -> (recipe, mergekit 0.1.5's output digest on the bf16 fixture)
CASES = {
    # mergekit's own examples/gradient-slerp.yml writes `pattern:`; mergekit ignores the key, so the
    # first entry has no filter and its gradient applies to every tensor
    "pattern": ("""slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {m1}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - pattern: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - pattern: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""", "2f26a3f437f2a3ac"),
    "pattern as mergekit reads it": ("""merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t: [0, 0.5, 0.3, 0.7, 1]
dtype: float16
""", "2f26a3f437f2a3ac"),
    # a second-stage slerp that lists only the other model: mergekit adds base_model to the inputs
    "slerp base not listed": ("""merge_method: slerp
dtype: bfloat16
base_model: {base}
models:
  - model: {m1}
parameters:
  t: 0.45
""", "3b61b3a9bcb41c5e"),
    "slerp base listed": ("""merge_method: slerp
dtype: bfloat16
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t: 0.45
""", "3b61b3a9bcb41c5e"),
    # modules: {default: ...} (mergekit's one module of a causal LM), as published with dare_ties/della
    "modules default": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
modules:
  default:
    slices:
    - sources:
      - layer_range: [0, 4]
        model: {m1}
        parameters:
          density: 0.6
          weight: 0.3
      - layer_range: [0, 4]
        model: {m2}
        parameters:
          density: 0.6
          weight: 0.7
      - layer_range: [0, 4]
        model: {base}
""", "37205dd487deb588"),
    "modules default, written flat": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
models:
  - model: {m1}
    parameters: {{density: 0.6, weight: 0.3}}
  - model: {m2}
    parameters: {{density: 0.6, weight: 0.7}}
""", "37205dd487deb588"),
    # the module's parameters take precedence over the top-level ones
    "modules default parameters": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
parameters: {{density: 0.9, weight: 0.5}}
modules:
  default:
    models:
      - model: {m1}
      - model: {m2}
    parameters: {{density: 0.2, weight: 0.4}}
""", "22c1d2bbcc4a2137"),
    "modules default parameters, written flat": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
parameters: {{density: 0.2, weight: 0.4}}
models:
  - model: {m1}
  - model: {m2}
""", "22c1d2bbcc4a2137"),
    # a sliced linear does not average a base_model its slices do not list (a `models:` one does)
    "sliced linear, base not a source": ("""base_model: {base}
dtype: bfloat16
merge_method: linear
parameters: {{weight: 0.5}}
slices:
  - sources:
    - layer_range: [0, 4]
      model: {m1}
    - layer_range: [0, 4]
      model: {m2}
""", "a2f81d32a2c04af6"),
    # only base_model (a published task arithmetic bakes a LoRA into it so): mergekit writes the base
    "only the base": ("""base_model: {m1}
dtype: bfloat16
merge_method: task_arithmetic
parameters:
  normalize: false
slices:
- sources:
  - layer_range: [0, 4]
    model: {m1}
    parameters:
      weight: 1.0
""", "4ad9909a22d0e9a1"),
    # `normalize: 1.0` (a published della recipe): mergekit reads 1.0 as true, 0.0 as false
    "booleans as numbers": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
parameters: {{density: 0.5, normalize: 0.0, int8_mask: 1.0}}
models:
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.4}}
""", "d5da9bcbe27f60a3"),
    "booleans": ("""base_model: {base}
dtype: bfloat16
merge_method: ties
parameters: {{density: 0.5, normalize: false, int8_mask: true}}
models:
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.4}}
""", "d5da9bcbe27f60a3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_published_forms_give_mergekit_bytes(families, tmp_path, case):
    base, fts, inputs = families["bfloat16"]
    if inputs != INPUTS["bfloat16"]:
        pytest.skip("this torch builds other tiny models than the ones mergekit's digests were recorded on")
    body, expected = CASES[case]
    recipe = tmp_path / "r.yml"
    recipe.write_text(body.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2]))
    hf_metagpt.merge(recipe=str(recipe), output=str(tmp_path / "out"), device="cpu")
    assert digest(load(tmp_path / "out")) == expected


def test_pattern_is_a_warning_and_the_entry_loses_its_filter(caplog):
    text = CASES["pattern"][0].format(base="org/a", m1="org/b")
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        values = parse_mergekit(text, "gradient-slerp.yml")
    assert values["parameters"]["t"] == [{"value": [0, 0.5, 0.3, 0.7, 1]}, {"value": [1, 0.5, 0.7, 0.3, 0]},
                                         {"value": 0.5}]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "key 'pattern' of a filtered value of 't' is ignored" in said[0]
    assert "gradient-slerp.yml, line 11" in said[0] and "gradient-slerp.yml, line 13" in said[1]
    assert "applies to every tensor" in said[0]


def test_modules_default_reads_as_the_top_level():
    text = CASES["modules default parameters"][0].format(base="org/base", m1="org/a", m2="org/b")
    values = parse_mergekit(text)
    assert values["models"] == ["org/a", "org/b"] and values["base"] == "org/base"
    assert values["parameters"]["weights"] == [0.4, 0.4] and values["parameters"]["density"] == 0.2


@pytest.mark.parametrize("text, fragment, hint", [
    ("merge_method: ties\nbase_model: b\nmodules:\n  text_decoder:\n    models: [a]\n  vision_tower:\n    models: [a]\n",
     "mergekit `modules` ['text_decoder', 'vision_tower']", "merges each named module of a multimodal architecture"),
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nmodules:\n  default:\n    models: [c]\n",
     "gives `models` both at the top and under modules.default", "Give the models once"),
    ("merge_method: slerp\nbase_model: b\nmodels: [a, c]\nparameters: {t: 0.5}\n",
     "slerp merges exactly two models", "Merge method requires exactly 2 inputs"),
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {weight: 1, normalize: 0.5}\n",
     "normalize must be true or false, got 0.5", None),
    ("merge_method: ties\nbase_model: b\nparameters: {weight: 1}\nslices:\n  - sources:\n"
     "    - {model: a, layer_range: [0, 4]}\n    - {model: c, layer_range: [0, 4]}\n",
     "base_model 'b' is not a source of the slices", "Base input is not present in merge inputs"),
])
def test_what_mergekit_refuses_or_we_do_not_read_says_why(text, fragment, hint):
    with pytest.raises(RecipeError) as err:
        parse_mergekit(text)
    assert fragment in err.value.message and (hint is None or hint in err.value.hint)


def test_cli_runs_the_gradient_slerp_example_and_says_what_it_ignored(families, tmp_path):
    import subprocess

    base, fts, _ = families["bfloat16"]
    outs = []
    for name in ("pattern", "pattern as mergekit reads it"):
        recipe = tmp_path / f"{len(outs)}.yml"
        recipe.write_text(CASES[name][0].format(base=base, m1=fts[0]))
        proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "-o",
                               str(tmp_path / recipe.stem), "--device", "cpu"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append((digest(load(tmp_path / recipe.stem)), proc.stdout + proc.stderr))
    (got, said), (want, plain_said) = outs
    assert got == want
    assert said.count("key 'pattern' of a filtered value of 't' is ignored") == 2 and "0.yml, line 11" in said
    assert "pattern" not in plain_said and "Traceback" not in said


def test_only_the_base_is_the_base_itself(families, tmp_path, caplog):
    base, fts, _ = families["bfloat16"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(CASES["only the base"][0].format(base=base, m1=fts[0]))
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        hf_metagpt.merge(recipe=str(recipe), output=str(tmp_path / "out"), device="cpu")
    got, want = load(tmp_path / "out"), load(fts[0])
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert any("lists no model besides base_model" in r.getMessage() for r in caplog.records)
