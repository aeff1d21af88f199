"""A MetaGPT merge of many fine-tunes: what it writes beside the weights stays small and readable.

The geometry (τi·τj per tensor) grows with T²: at T = 100 the coefficients file was 15.6 MB and the
card 2.2 MB, and drawing the cosine plot (a line per pair) took most of a minute. Now the card and the
plots show the most similar pairs, the full Gram matrices go to one float64 NumPy file (metagpt_gram.npy), and a
merge of more than 32 fine-tunes warns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_metagpt.demo.tiny import build_family
from hf_metagpt.insight.report import read_gram

ROOT = Path(__file__).resolve().parents[2]
T = 40


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("many"), n_models=T)


def test_many_models_side_files_stay_small_and_the_full_gram_is_kept(many, tmp_path):
    base, fts = many
    out = tmp_path / "merged"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(base), *map(str, fts),
                           "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{T} fine-tunes: MetaGPT's λ shrink like 1/{T}" in proc.stderr

    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert (out / "metagpt_coefficients.json").stat().st_size < 200_000
    assert coeffs["geometry"]["tensors_file"] == "metagpt_gram.npy" and "tensors" not in coeffs["geometry"]
    # The full geometry, exactly: its diagonal summed over the tensors is the merge's ‖τt‖², and its
    # whole-model Gram matrix the one the JSON keeps.
    geo = read_gram(out / "metagpt_gram.npy")
    assert len(geo.models) == T and geo.models[0] == fts[0].name
    assert list(geo.whole.sq_norms) == coeffs["groups"]["model"]["sq_norms"]
    assert [list(r) for r in geo.whole.values] == coeffs["groups"]["model"]["gram"]
    weights = {n for n in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]}
    assert {n for n, _ in geo.entries} <= weights
    diag = torch.tensor([list(g.sq_norms) for _, g in geo.entries], dtype=torch.float64).sum(0)
    torch.testing.assert_close(diag, torch.tensor(coeffs["groups"]["model"]["sq_norms"], dtype=torch.float64),
                               rtol=1e-12, atol=0)

    card = (out / "README.md").read_text()
    assert len(card) < 40_000
    assert f"{T} fine-tunes make {T * (T - 1) // 2} pairs; the 10 with the largest |cos|" in card
    assert "| cosine | [1] | [2]" not in card  # no T×T matrix
    for png in ("metagpt_cosines.png", "metagpt_lambdas.png", "metagpt_layer_shares.png"):
        assert (out / png).stat().st_size < 400_000, png


def test_a_few_models_keep_every_matrix_in_the_json(tmp_path):
    base, fts = build_family(tmp_path / "few", n_models=3)
    import hf_metagpt

    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "o"),
                              progress=False, device="cpu")
    data = json.loads((tmp_path / "o" / "metagpt_coefficients.json").read_text())
    assert "tensors" in data["geometry"]
    assert read_gram(tmp_path / "o" / "metagpt_gram.npy").entries == \
        tuple((n, g) for n, g in result.geometry.entries)
