"""The streaming MetaGPT engine against an independent whole-model float64 computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hf_metagpt
from hf_metagpt.demo.tiny import build_family
from reference import assert_within_ulp, load_state, reference_metagpt


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, fts = build_family(root, n_models=3)
    return root, base, fts


def test_fixture_has_layers_straddling_shards(family):
    _, base, _ = family
    wm = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    files_per_layer = {}
    for name, f in wm.items():
        if ".layers." in name:
            files_per_layer.setdefault(name.split(".layers.")[1].split(".")[0], set()).add(f)
    assert len(set(wm.values())) >= 3
    assert any(len(fs) > 1 for fs in files_per_layer.values()), "no layer straddles two shards"


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_merge_equals_independent_metagpt(family, tmp_path, granularity):
    _, base, fts = family
    out = tmp_path / "merged"
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out),
                              granularity=granularity, max_shard_size="60KB", device="cpu")
    expected, lambdas = reference_metagpt(load_state(base), [load_state(f) for f in fts], granularity)
    actual = load_state(out)
    assert sorted(actual) == sorted(expected)
    for name, e in expected.items():
        assert_within_ulp(actual[name], e, torch.bfloat16)
    # Coefficients: same groups, same values, summing to 1.
    assert set(result.coefficients) == set(lambdas)
    for g, lam in lambdas.items():
        assert result.coefficients[g] == pytest.approx(lam, rel=1e-6, abs=1e-12)
        assert sum(result.coefficients[g]) == pytest.approx(1.0, abs=1e-12)
    if granularity == "layer":
        per_layer = {tuple(round(x, 4) for x in result.coefficients[f"layers.{i}"]) for i in range(4)}
        assert len(per_layer) > 1, "fixture should give different λ per layer"
    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert coeffs["granularity"] == granularity and coeffs["method"] == "metagpt"
    assert coeffs["groups"][next(iter(lambdas))]["lambdas"] == pytest.approx(next(iter(lambdas.values())))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert len(set(index["weight_map"].values())) > 1  # sharded by --max-shard-size
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in actual.values())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "work folder left behind"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_merged_model_loads_with_reference_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base, fts = family
    out = tmp_path / "merged"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu")
    expected, _ = reference_metagpt(load_state(base), [load_state(f) for f in fts], "model")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(base)
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in expected.items()})
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert not torch.equal(want, AutoModelForCausalLM.from_pretrained(base)(ids).logits.float())


def test_output_dtype_float32_and_recipe_matches_flags(family, tmp_path):
    _, base, fts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\nmodels:\n" + "".join(f"  - {f}\n" for f in fts) +
                      "granularity: layer\ndtype: float32\n")
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--recipe", str(recipe),
                        "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layers.0" in r.stdout and "peak memory" in r.stdout
    states = [load_state(base)] + [load_state(f) for f in fts]
    expected, _ = reference_metagpt(states[0], states[1:], "layer")
    actual = load_state(out)
    for name, e in expected.items():
        # Computed in float32 as docs/method.md says: exact to a few ulp of the inputs' size.
        scale = torch.stack([s[name].double().abs() for s in states]).amax(0)
        assert_within_ulp(actual[name], e, torch.float32, ulps=2, scale=scale)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_interrupted_run_leaves_no_output_and_resumes_to_same_bytes(family, tmp_path, monkeypatch):
    from hf_metagpt.engine import merging

    _, base, fts = family
    args = dict(base=str(base), models=[str(f) for f in fts], max_shard_size="40KB", device="cpu", progress=False)
    clean = tmp_path / "clean"
    hf_metagpt.merge(output=str(clean), **args)

    calls = {"n": 0}
    real = merging.FusedKernel.merge

    def crash_later(self, tensors, raws, piece, coefs, *alloc):
        calls["n"] += len(tensors)
        if calls["n"] >= 25:
            raise KeyboardInterrupt("simulated kill")
        return real(self, tensors, raws, piece, coefs, *alloc)

    monkeypatch.setattr(merging.FusedKernel, "merge", crash_later)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        hf_metagpt.merge(output=str(out), **args)
    assert not out.exists()
    work = tmp_path / ".out.hf-metagpt-partial"
    assert work.is_dir() and not (work / "model.safetensors.index.json").exists()
    finished = sorted(p.name for p in work.glob("model-*.safetensors"))
    assert finished, "some shards should have finished before the crash"

    monkeypatch.setattr(merging.FusedKernel, "merge", real)
    result = hf_metagpt.merge(output=str(out), **args)
    assert result.stats.shards_reused == len(finished)
    assert result.stats.passes == 1  # norms of pass 1 kept beside the output
    for f in sorted(clean.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not work.exists()


def test_rerun_with_overwrite_reuses_cached_norms(family, tmp_path):
    _, base, fts = family
    args = dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False)
    out = tmp_path / "out"
    first = hf_metagpt.merge(output=str(out), **args)
    assert first.stats.passes == 2
    second = hf_metagpt.merge(output=str(out), overwrite=True, **args)
    assert second.stats.passes == 1
    assert second.coefficients == first.coefficients
