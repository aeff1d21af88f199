"""`hf-metagpt inspect`: one streamed pass, nothing written, values equal to an independent float64 computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.insight.geometry import COSINE_LIMIT
from hf_metagpt.demo.tiny import build_family
from helpers import publish, run_cli
from reference import group_of, load_state


def _add_shared(folders: list[Path], name: str, scale: float, seed: int = 7) -> None:
    """Add one random vector to tensor `name` of every folder: their task vectors overlap there."""
    shared = None
    for folder in folders:
        for shard in folder.glob("*.safetensors"):
            tensors = load_file(shard)
            if name in tensors:
                t = tensors[name]
                if shared is None:
                    shared = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * scale
                tensors[name] = (t.float() + shared).to(t.dtype)
                save_file(tensors, shard, metadata={"format": "pt"})


def overlapping_family(root: Path) -> tuple[Path, list[Path]]:
    """A base and chat/math/code fine-tunes where chat and math overlap in lm_head."""
    base, fts = build_family(root, names=["chat", "math", "code"])
    _add_shared(fts[:2], "lm_head.weight", 0.05)
    return base, fts


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return overlapping_family(tmp_path_factory.mktemp("inspect"))


def reference(base: Path, fts: list[Path], granularity: str) -> dict[str, list[list[float]]]:
    """Σ τi·τj per group, float64, over whole state dicts."""
    b = load_state(base)
    states = [load_state(f) for f in fts]
    out: dict[str, list[list[float]]] = {}
    for name, t in b.items():
        if not t.is_floating_point():
            continue
        taus = [(s[name].double() - t.double()).reshape(-1) for s in states]
        acc = out.setdefault(group_of(name, granularity), [[0.0] * len(fts) for _ in fts])
        for i in range(len(fts)):
            for j in range(len(fts)):
                acc[i][j] += float(taus[i] @ taus[j])
    return out


def _cos(d, i, j):
    return d[i][j] / math.sqrt(d[i][i] * d[j][j])


def test_inspect_json_equals_an_independent_float64_computation_and_writes_nothing(family, tmp_path, capsys, monkeypatch,
                                                                                   caplog):
    base, fts = family
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for f in [base, *fts] for p in f.iterdir()}
    code, out, err = run_cli(["inspect", "-q", "--base", str(base), *map(str, fts), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["models"] == [str(f) for f in fts]
    whole = reference(base, fts, "model")["model"]
    assert data["model"]["sq_norms"] == pytest.approx([whole[i][i] for i in range(3)], rel=1e-12)
    for i in range(3):
        assert data["model"]["cosine"][i] == pytest.approx([_cos(whole, i, j) for j in range(3)], rel=1e-9, abs=1e-12)
    layers = reference(base, fts, "layer")
    assert list(data["groups"]) == sorted(layers, key=list(data["groups"]).index) and set(data["groups"]) == set(layers)
    for g, d in layers.items():
        assert data["groups"][g]["sq_norms"] == pytest.approx([d[i][i] for i in range(3)], rel=1e-12)
        for i in range(3):
            assert data["groups"][g]["cosine"][i] == pytest.approx([_cos(d, i, j) for j in range(3)], rel=1e-9, abs=1e-12)
        assert data["lambdas"]["layer"][g] == pytest.approx([d[i][i] / sum(d[k][k] for k in range(3)) for i in range(3)])
    # The constructed overlap is found and explained, in the log too (stdout is the JSON object).
    assert data["groups"]["lm_head.weight"]["cosine"][0][1] > COSINE_LIMIT
    assert {"models": [str(fts[0]), str(fts[1])], "group": "lm_head.weight"}.items() <= data["overlaps"][-1].items()
    assert len(data["warnings"]) == 1 and "lm_head.weight" in data["warnings"][0] and "lm_head.weight" in caplog.text
    # Nothing written: no file beside the inputs or in the working folder, inputs untouched.
    assert {p: p.stat().st_mtime_ns for f in [base, *fts] for p in f.iterdir()} == before
    assert list(tmp_path.iterdir()) == []


def test_inspect_diagonals_are_the_merge_norms_bit_for_bit(family, tmp_path):
    base, fts = family
    result = hf_metagpt.inspect(base=str(base), models=[str(f) for f in fts], progress=False, device="cpu")
    merged = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "m"),
                              granularity="layer", device="cpu", progress=False)
    assert {g: list(gram.sq_norms) for g, gram in result.geometry.layers.items()} == merged.sq_norms
    assert {g: list(gram.shares) for g, gram in result.geometry.layers.items()} == merged.coefficients


def test_inspect_table_and_plots(family, tmp_path, capsys):
    base, fts = family
    code, out, err = run_cli(["inspect", "-q", "--base", str(base), *map(str, fts), "--plot", str(tmp_path / "p"),
                              "--granularity", "layer"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"Task vectors of 3 model(s) on {base} (float64 dot products)"
    assert any(line.startswith("layers.3 ") for line in lines) and any(line.startswith("whole model") for line in lines)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "chat" in warning and "math" in warning and "lm_head.weight" in warning
    assert "--granularity layer" not in warning and "hf-metagpt compare" in warning
    assert "nothing written" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "metagpt_cosines.png", "metagpt_lambda_bars.png", "metagpt_layer_shares.png"]


def test_inspect_refuses_what_a_merge_refuses(family, tmp_path, capsys):
    base, fts = family
    code, _, err = run_cli(["inspect", "--base", str(base)], capsys)
    assert code == 2 and "No fine-tuned model given" in err
    code, _, err = run_cli(["inspect", "--base", str(base), str(tmp_path / "missing")], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_inspect_by_hub_id_low_disk_equals_local(family, tmp_path, hub_user, local_hub):
    base, fts = family
    ids = publish([base, *fts[:2]], hub_user, "insp")  # the helper publishes a base and two fine-tunes
    local = hf_metagpt.inspect(base=str(base), models=[str(f) for f in fts[:2]], progress=False, device="cpu")
    remote = hf_metagpt.inspect(base=ids[0], models=ids[1:], progress=False, device="cpu", low_disk=True)
    assert remote.geometry.entries == local.geometry.entries
    assert remote.models == tuple(ids[1:])
    assert remote.bytes_read > 0 and len(remote.warnings) == 1 and "lm_head.weight" in remote.warnings[0]
    data = remote.to_json()
    assert data["base"].startswith(ids[0] + "@") and len(data["base"].split("@")[1]) == 40
    assert [m["repo_id"] for m in data["inputs"]["models"]] == ids[1:]
    assert all(len(m["sha"]) == 40 for m in data["inputs"]["models"])


def test_plan_points_at_inspect_for_metagpt_only(family, capsys):
    base, fts = family
    code, out, _ = run_cli(["plan", "--base", str(base), *map(str, fts)], capsys)
    assert code == 0 and "note: MetaGPT's λ assume the task vectors are orthogonal" in out and "hf-metagpt inspect" in out
    code, out, _ = run_cli(["plan", "--base", str(base), *map(str, fts), "--method", "ties"], capsys)
    assert code == 0 and "hf-metagpt inspect" not in out
