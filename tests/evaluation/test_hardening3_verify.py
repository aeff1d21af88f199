"""`verify --against` on merges where the task vectors cancel the base: a correct merge passes, a
changed one still fails (a verifier that cries wolf is worse than none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.demo.tiny import build_family
from hf_metagpt.sources.local import INDEX_FILE
from helpers import copy_model


def _shrunk(base: Path, dst: Path, seed: int) -> Path:
    """A fine-tune whose every floating weight is ~1e-5 of the base's: τ ≈ −θ0, so the merge
    θ0 + Σλτ cancels the base almost entirely (the float32 rounding of θ0 + λτ is then many output ulps)."""
    copy_model(base, dst)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(shard)
        for k, v in tensors.items():
            if v.is_floating_point():
                scale = 1e-5 * (1 + 0.3 * torch.randn(v.shape, generator=gen))
                tensors[k] = (v.float() * scale).to(v.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    root = tmp_path_factory.mktemp("h3verify")
    base, _ = build_family(root, n_models=1)
    fts = [_shrunk(base, root / f"small{i}", i) for i in (1, 2)]
    return root, base, fts


def _verify(out: Path, base: Path, fts: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "verify", str(out), "--against", str(base),
                           *map(str, fts), "--samples", "1000"], capture_output=True, text=True, timeout=300)


#: parameters under which each method's merge cancels the base (Σ weights of the task vectors = 1)
CANCEL = {"metagpt": {}, "task_arithmetic": {"lambda": 0.5}, "ties": {"density": 1.0, "lambda": 1.0}}


@pytest.mark.parametrize("method", sorted(CANCEL))
def test_verify_accepts_a_correct_merge_whose_task_vectors_cancel_the_base(cancelling, tmp_path, method):
    root, base, fts = cancelling
    out = tmp_path / method
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), method=method,
                     parameters=CANCEL[method], device="cpu", progress=False)
    merged = load_file(next(out.glob("*.safetensors")))
    name = "model.layers.0.mlp.down_proj.weight"
    assert merged[name].float().abs().max() < 1e-3 * load_file_all(base)[name].float().abs().max()
    proc = _verify(out, base, fts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(json.loads((out / INDEX_FILE).read_text())["weight_map"])
    assert f"OK: {n} tensor(s) recomputed from the inputs match" in proc.stdout


def test_verify_still_finds_a_changed_entry_where_task_vectors_cancel_the_base(cancelling, tmp_path):
    root, base, fts = cancelling
    out = tmp_path / "m"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu", progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = out / json.loads((out / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(shard)
    t = tensors[name].clone()
    t.view(-1)[3] = t.view(-1)[3] * 1.05  # 5 %: a dozen bf16 ulps, far inside the base's magnitude
    tensors[name] = t
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = _verify(out, base, fts)
    assert proc.returncode != 0
    assert f"tensor {name!r} differs from its recomputation in 1 element(s)" in proc.stdout + proc.stderr


def load_file_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out
