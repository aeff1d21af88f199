"""What mergekit 0.1.5 accepts runs here too: keys and parameters it ignores are said (a warning
naming the line, "did you mean" for near misses) and ignored; its refusals stay refusals, with its
reason. Each case was run through mergekit 0.1.5 when this was written: it ran every recipe of
`ACCEPTED` (ignoring those keys) and stopped on every recipe of `REFUSED`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import load_state

from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.errors import RecipeError
from hf_metagpt.mergekit_recipe import parse_mergekit as _parse


def parse_mergekit(text: str, source: str = "<recipe>") -> dict:
    """The recipe's values without the arithmetic choice (methods/mergekit_order.py's, tested there)."""
    values = _parse(text, source)
    values.get("parameters", {}).pop("mergekit_order", None)
    if values.get("parameters") == {}:
        del values["parameters"]
    return values

MODELS = """base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {weight: 0.5, density: 0.5}
  - model: org/b
    parameters: {weight: 0.5, density: 0.5}
"""
PLAIN = {"method": "ties", "base": "org/base", "models": ["org/a", "org/b"],
         "parameters": {"weights": [0.5, 0.5], "density": 1.0, "per_model": [{"density": 0.5}, {"density": 0.5}]}}


@pytest.mark.parametrize("extra, said", [
    ("name: my-merge\n", ["recipe key 'name' is ignored: it is not a mergekit key", "line 1"]),
    ("dype: bfloat16\n", ["recipe key 'dype' is ignored", "did you mean 'dtype'?"]),
    ("t: 0.5\n", ["recipe key 't' is ignored: mergekit reads it only under `parameters:`"]),
    ("int8_mask: true\nnormalize: true\n", ["recipe key 'int8_mask' is ignored", "recipe key 'normalize' is ignored"]),
    ("parameters:\n  select_topk: 0.5\n", ["parameter 'select_topk' is ignored: merge_method ties does not take it"]),
    ("parameters:\n  nomalize: true\n", ["parameter 'nomalize' is ignored", "did you mean 'normalize'?"]),
    ("parameters:\n", []),  # empty parameters
])
def test_keys_mergekit_ignores_are_warnings(extra, said, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        values = parse_mergekit(extra + "merge_method: ties\n" + MODELS, "r.yml")
    assert values == PLAIN  # what is ignored changes nothing
    text = caplog.text
    for fragment in said:
        assert fragment in text
    assert ("mergekit 0.1.5 ignores it too" in text) == bool(said)


def test_parameters_a_method_ignores_are_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        stock = parse_mergekit("merge_method: model_stock\n" + MODELS, "r.yml")
        sce = parse_mergekit("merge_method: sce\n" + MODELS + "parameters: {select_topk: 0.5, normalize: true}\n", "r.yml")
    assert stock == {"method": "model_stock", "base": "org/base", "models": ["org/a", "org/b"]}
    assert sce == {"method": "sce", "base": "org/base", "models": ["org/a", "org/b"], "parameters": {"select_topk": 0.5}}
    assert "parameter 'weight' is ignored: merge_method model_stock does not take it" in caplog.text
    assert "parameter 'normalize' is ignored: merge_method sce does not take it" in caplog.text


def test_a_method_wide_parameter_under_a_model_is_ignored(caplog):
    """mergekit 0.1.5 ignores a per-model `lambda` (the output equals the recipe without it)."""
    text = ("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/a\n"
            "    parameters: {weight: 0.5, lambda: 0.3}\n  - model: org/b\n    parameters: {weight: 0.5}\n")
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        values = parse_mergekit(text, "r.yml")
    assert values == {"method": "task_arithmetic", "base": "org/base", "models": ["org/a", "org/b"],
                      "parameters": {"weights": [0.5, 0.5]}}
    assert "parameter 'lambda' is ignored under a model: it applies to the whole merge" in caplog.text
    assert "r.yml, line 5" in caplog.text


def test_linear_averages_a_base_model_it_does_not_list():
    """mergekit's linear reads base_model as one more input to average (with the global weight)."""
    text = "merge_method: linear\nbase_model: org/base\nmodels: [org/a, org/b]\nparameters: {weight: 0.5}\n"
    assert parse_mergekit(text) == {"method": "linear", "base": "org/base",
                                    "models": ["org/base", "org/a", "org/b"],
                                    "parameters": {"weights": [0.5, 0.5, 0.5]}}


@pytest.mark.parametrize("text, fragment, reason", [
    ("merge_method: ties\nmodels:\n  - model: org/a\n    parameters: {weight: 1}\n",
     "merge_method 'ties' needs a base_model", "Merge method requires a base input"),
    ("merge_method: slerp\nmodels: [org/a, org/b]\nparameters: {t: 0.3}\n",
     "merge_method 'slerp' needs a base_model", "Merge method requires a base input"),
    ("merge_method: task_arithmetic\nbase_model: org/base\nmodels: [org/a, org/b]\n",
     "Model 'org/a' has no weight (r.yml, line 3)", "Missing required parameter weight"),
    ("merge_method: linear\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters: {weight: 1}\n",
     "Model 'org/base' has no weight (r.yml, line 2)", "Missing required parameter weight"),
])
def test_mergekit_refusals_stay_refusals_with_its_reason(text, fragment, reason):
    with pytest.raises(RecipeError) as info:
        parse_mergekit(text, "r.yml")
    assert fragment in info.value.message
    assert reason in info.value.hint


@pytest.mark.slow
def test_cli_runs_a_recipe_with_ignored_keys_and_says_so(tmp_path):
    base, (a, b) = build_family(tmp_path / "fam", n_models=2, spec=TinySpec(num_hidden_layers=2), seed=3)
    recipe = tmp_path / "r.yml"
    body = textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5}}
        dtype: bfloat16
    """)
    recipe.write_text("name: mine\ndype: float16\nparameters:\n" + body)
    plain = tmp_path / "plain.yml"
    plain.write_text(body)
    outs = []
    for r in (recipe, plain):
        proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(r), "-o",
                               str(tmp_path / r.stem), "--device", "cpu"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append((load_state(tmp_path / r.stem), proc.stdout + proc.stderr))
    (got, said), (want, _) = outs
    assert "recipe key 'dype' is ignored" in said and "did you mean 'dtype'?" in said and "r.yml, line 2" in said
    assert "Traceback" not in said
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
