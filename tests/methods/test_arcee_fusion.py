"""Arcee Fusion (`methods/arcee_fusion.py`): mergekit's bytes on its recipes in float32, bfloat16 and
float16, the formula checked against an independent float64 computation, and how recipes are read."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.errors import MergeError, RecipeError
from hf_metagpt.mergekit_recipe import parse_mergekit
from hf_metagpt.methods import get_method
from hf_metagpt.methods.arcee_fusion import arcee_fusion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_karcher import digest, load  # noqa: E402  (the digest of the other mergekit tests)

#: sha256 (first 16 hex digits) of the fixtures (tiny LLaMA, seed 3: base, ft1..ft3, in each dtype)
INPUTS = {"float32": "9e0bcc9c4a29ed0b", "bfloat16": "3678f81c402f3dd8", "float16": "5511155c542cb9eb"}
#: (fixture dtype, base, other, out_dtype line) -> mergekit 0.1.5's output digest
#: (`mergekit-yaml r.yml out` on CPU, torch 2.13, recorded 2026-12-04; the recipe is `RECIPE` below).
#: Without out_dtype a bf16/fp16 recipe's output is float32 (mergekit's mask is float32).
CASES = {
    ("float32", "base", "ft1", ""): "5827ae8ded552572",
    ("float32", "ft1", "ft3", ""): "9a4ab2db5f7ce5e5",
    ("float32", "ft2", "base", ""): "e3f7220a755e34c3",
    ("bfloat16", "base", "ft1", ""): "0a185e9c978702ab",
    ("bfloat16", "ft1", "ft3", "out_dtype: bfloat16\n"): "6ee5b2c051ec52af",
    ("float16", "base", "ft1", ""): "eef2be49b4f1f146",
}
RECIPE = """models:
  - model: {base}
  - model: {other}
merge_method: arcee_fusion
base_model: {base}
dtype: {dtype}
{out}"""


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for dtype in INPUTS:
        root = tmp_path_factory.mktemp(f"fusion-{dtype}")
        base, fts = build_family(root, n_models=3, spec=TinySpec(dtype=getattr(torch, dtype)), seed=3)
        state = {f"{m.name}/{k}": v for m in (base, *fts) for k, v in load(m).items()}
        out[dtype] = ({"base": base, "ft1": fts[0], "ft2": fts[1], "ft3": fts[2]}, digest(state))
    return out


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{'-out' if c[3] else ''}")
def test_arcee_fusion_recipes_give_mergekit_bytes(families, tmp_path, case):
    dtype, base, other, out = case
    folders, inputs = families[dtype]
    if inputs != INPUTS[dtype]:
        pytest.skip("this torch builds other tiny models than the ones mergekit's digests were recorded on")
    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPE.format(base=folders[base], other=folders[other], dtype=dtype, out=out))
    result = hf_metagpt.merge(recipe=str(recipe), output=str(tmp_path / "out"), device="cpu")
    assert result.method == "arcee_fusion" and result.precision == f"mergekit {dtype}"
    state = load(tmp_path / "out")
    assert {t.dtype for t in state.values()} == {torch.bfloat16 if out else torch.float32}
    assert digest(state) == CASES[case]


# --------------------------------------------------------------------------- the formula, in float64


def _reference(base: list[list[float]], other: list[list[float]]) -> list[list[float]]:
    """The method from its definition, in Python floats (written here independently)."""
    imp = []
    for r0, r1 in zip(base, other):
        z0, z1 = sum(math.exp(x) for x in r0), sum(math.exp(x) for x in r1)
        p, q = [math.exp(x) / z1 for x in r1], [math.exp(x) / z0 for x in r0]
        kl = sum(pi * math.log((pi + 1e-8) / (qi + 1e-8)) for pi, qi in zip(p, q))
        imp.append([abs(b - a) * kl for a, b in zip(r0, r1)])
    flat = sorted(x for row in imp for x in row)
    n = len(flat)
    q1, med, q3 = (flat[max(1, int(n * f)) - 1] for f in (0.25, 0.5, 0.75))
    fence = med + 1.5 * (q3 - q1)
    return [[b if i >= fence else a for a, b, i in zip(r0, r1, ri)] for r0, r1, ri in zip(base, other, imp)]


def test_fusion_matches_its_definition_in_float64():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(24, 16, generator=g, dtype=torch.float64)
    scale = torch.rand(24, 1, generator=g, dtype=torch.float64)  # rows that change more and less
    other = base + 0.2 * scale * torch.randn(24, 16, generator=g, dtype=torch.float64)
    got = arcee_fusion(base, other)
    expected = torch.tensor(_reference(base.tolist(), other.tolist()), dtype=torch.float64)
    assert torch.equal(got, expected)
    moved = int((got != base).sum())
    assert 0 < moved < base.numel() // 4  # only the outliers move
    # a 1-D tensor is one row; our own arithmetic (combine, float32) is the same formula
    v0, v1 = base[0], other[0]
    assert torch.equal(arcee_fusion(v0, v1), torch.tensor(_reference([v0.tolist()], [v1.tolist()])[0], dtype=torch.float64))
    m = get_method("arcee_fusion")
    b32, o32 = base.float(), other.float()
    own = m.combine(b32.clone(), [o32 - b32], m.coefficients(None, 1))
    ref32 = torch.tensor(_reference(b32.double().tolist(), (b32 + (o32 - b32)).double().tolist()))
    assert (own.double() == ref32).float().mean() > 0.999  # float32 rounding may tip an element at the fence


def test_arcee_fusion_recipe_reading_and_refusals(caplog):
    parsed = parse_mergekit("merge_method: arcee_fusion\nbase_model: a/b\nmodels:\n  - model: a/b\n"
                            "  - model: a/x\n    parameters: {weight: 0.5}\nparameters: {normalize: true}\n"
                            "dtype: bfloat16\n", "r.yml")
    assert parsed["base"] == "a/b" and parsed["models"] == ["a/x"]
    assert parsed["parameters"] == {"mergekit_order": "bfloat16"} and parsed["dtype"] == "float32"
    assert ("parameter 'weight' is ignored: merge_method arcee_fusion does not take it (it takes no parameters)"
            in caplog.text)
    assert "parameter 'normalize' is ignored" in caplog.text
    kept = parse_mergekit("merge_method: arcee_fusion\nbase_model: a/b\nmodels: [a/b, a/x]\n"
                          "dtype: float32\nout_dtype: bfloat16\n")
    assert kept["dtype"] == "bfloat16"
    with pytest.raises(RecipeError, match="arcee_fusion merges exactly two models: base_model and one other"):
        parse_mergekit("merge_method: arcee_fusion\nbase_model: a/b\nmodels: [a/b, a/x, a/y]\n")
    with pytest.raises(RecipeError, match="needs a base_model"):
        parse_mergekit("merge_method: arcee_fusion\nmodels: [a/x, a/y]\n")
    with pytest.raises(MergeError, match="exactly one other model; got 2"):
        get_method("arcee_fusion").coefficients(None, 2)


def test_cli_arcee_fusion_needs_one_other_model_and_merges_it(families, tmp_path):
    import os
    import subprocess
    import sys

    folders, _ = families["float32"]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))

    def run(*models: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--base", str(folders["base"]),
                               *models, "--method", "arcee_fusion", "--output", str(tmp_path / out),
                               "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)

    proc = run(str(folders["ft1"]), out="ok")
    assert proc.returncode == 0, proc.stderr
    merged, b, f = load(tmp_path / "ok"), load(folders["base"]), load(folders["ft1"])
    name = "model.layers.0.self_attn.q_proj.weight"
    want = torch.tensor(_reference(b[name].double().tolist(), f[name].double().tolist()), dtype=torch.float64)
    assert (merged[name].double() == want).float().mean() > 0.999
    moved = (merged[name] != b[name]).float().mean()
    assert 0.02 < moved < 0.15
    bad = run(str(folders["ft1"]), str(folders["ft2"]), out="bad")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "arcee_fusion' merges the base with exactly one other model; got 2" in bad.stderr
