"""NuSLERP (`methods/nuslerp.py`): mergekit's bytes on its recipes, and the formula checked independently."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.mergekit_recipe import parse_mergekit
from hf_metagpt.methods import get_method
from hf_metagpt.methods.base import TensorContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mergekit_order import INPUTS, digest, families, load  # noqa: E402,F401  (fixture reused)

#: name -> (recipe body, mergekit 0.1.5's output digest on the bf16 fixture), recorded 2026-12-04
CASES = {
    "no base, flattened, bf16": ("""merge_method: nuslerp
models:
  - model: {m1}
    parameters: {{weight: 0.4}}
  - model: {m2}
    parameters: {{weight: 0.6}}
dtype: bfloat16
""", "f96c7d448adf32ae"),
    "task vectors, flattened, bf16": ("""merge_method: nuslerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""", "21708da51c331578"),
    "task vectors, row-wise, bf16": ("""merge_method: nuslerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.65}}
  - model: {m2}
    parameters: {{weight: 0.35}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: bfloat16
""", "33ebfa5620bc08e9"),
    "no base, per vector, float32": ("""merge_method: nuslerp
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
out_dtype: bfloat16
""", "16aafed3d1365a72"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nuslerp_recipes_give_mergekit_bytes(families, tmp_path, case):
    base, fts, inputs = families["bfloat16"]
    if inputs != INPUTS["bfloat16"]:
        pytest.skip("this torch builds other tiny models than the ones mergekit's digests were recorded on")
    body, expected = CASES[case]
    recipe = tmp_path / "r.yml"
    recipe.write_text(body.format(base=base, m1=fts[0], m2=fts[1]))
    hf_metagpt.merge(recipe=str(recipe), output=str(tmp_path / "out"), device="cpu")
    assert digest(load(tmp_path / "out")) == expected


def _reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NuSLERP of two vectors in float64, from the definition (written here independently)."""
    a, b = a.double(), b.double()
    cos = float((a @ b) / (a.norm() * b.norm()))
    cos = max(-1.0, min(1.0, cos))
    if 1 - abs(cos) < 1e-8:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_its_formula_per_vector(flatten, row_wise):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g)
    m1, m2 = base + 0.3 * torch.randn(6, 5, generator=g), base + 0.3 * torch.randn(6, 5, generator=g)
    m = get_method("nuslerp", weights=[1.0, 3.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    got = m.combine(base.clone(), [m1 - base, m2 - base], m.coefficients(None, 2), TensorContext.of("w")).double()
    t = 3.0 / 4.0
    d1, d2 = (m1 - base).double(), (m2 - base).double()
    if flatten:
        expected = base.double() + _reference(t, d1.reshape(-1), d2.reshape(-1)).reshape(6, 5)
    elif row_wise:  # vectors along the first dimension (columns of the stored matrix)
        expected = base.double() + torch.stack([_reference(t, d1[:, j], d2[:, j]) for j in range(5)], dim=1)
    else:  # vectors along the last dimension (rows)
        expected = base.double() + torch.stack([_reference(t, d1[i], d2[i]) for i in range(6)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the models themselves (no base_model): interpolate θ1 and θ2, the base only carries them
    m = get_method("nuslerp", weights=[1.0, 3.0], task_vectors=False)
    got = m.combine(base.clone(), [m1 - base, m2 - base], m.coefficients(None, 2), TensorContext.of("w")).double()
    torch.testing.assert_close(got, _reference(t, m1.reshape(-1), m2.reshape(-1)).reshape(6, 5), rtol=1e-5, atol=1e-6)


def test_nuslerp_recipe_reading_and_refusals():
    no_base = parse_mergekit("merge_method: nuslerp\nmodels:\n  - model: a/x\n    parameters: {weight: [0.1, 0.9]}\n"
                             "  - model: a/y\n    parameters: {weight: 1}\ndtype: bfloat16\n")
    assert no_base["base"] == "a/x" and no_base["models"] == ["a/x", "a/y"]
    assert no_base["parameters"] == {"weights": [[0.1, 0.9], 1], "task_vectors": False, "mergekit_order": "bfloat16"}
    with_base = parse_mergekit("merge_method: nuslerp\nbase_model: a/b\nmodels:\n  - model: a/x\n  - model: a/y\n")
    assert with_base["models"] == ["a/x", "a/y"] and "task_vectors" not in with_base["parameters"]
    m = get_method("nuslerp", weights=[1, 2, 3])
    with pytest.raises(hf_metagpt.errors.MergeError, match="exactly two models; got 3"):
        m.coefficients(None, 3)
    with pytest.raises(hf_metagpt.errors.MergeError, match="sum to 0"):
        get_method("nuslerp", weights=[1, -1]).coefficients(None, 2)
    with pytest.raises(hf_metagpt.errors.MergeError, match="nuslerp_flatten must be true or false"):
        get_method("nuslerp", nuslerp_flatten="yes")
