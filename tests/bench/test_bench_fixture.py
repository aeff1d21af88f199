"""bench/make_fixture.py: the same bytes whatever the number of generating processes, and valid checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture()
def mf(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # spawned workers import make_fixture by name
    return importlib.import_module("make_fixture")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_fixture_bytes_do_not_depend_on_the_worker_count(mf, tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "SHARD_BYTES", 300_000)  # several shards per model
    shape = mf.Shape(128, 256, 3, 4, 2, vocab_size=600)
    one = mf.make_fixture(tmp_path / "one", seed=3, workers=1, shape=shape)
    three = mf.make_fixture(tmp_path / "three", seed=3, workers=3, shape=shape)
    assert [p.name for p in one] == ["base", "task_a", "task_b", "task_c"] == [p.name for p in three]
    d1, d3 = _tree_digest(tmp_path / "one"), _tree_digest(tmp_path / "three")
    assert d1 == d3 and len(d1) == 4 * (3 + mf.count_shards(mf.tensor_specs(shape)))
    assert mf.count_shards(mf.tensor_specs(shape)) > 2
    # another seed, other values (same layout)
    mf.make_fixture(tmp_path / "other", seed=4, workers=1, shape=shape)
    d4 = _tree_digest(tmp_path / "other")
    shards = [k for k in d1 if k.endswith(".safetensors")]
    assert d4.keys() == d1.keys() and all(d4[k] != d1[k] for k in shards)


def test_fixture_is_a_valid_sharded_checkpoint(mf, tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "SHARD_BYTES", 300_000)
    shape = mf.Shape(128, 256, 3, 4, 2, vocab_size=600)
    folders = mf.make_fixture(tmp_path / "fx", seed=0, workers=2, shape=shape)
    specs = {name: dims for name, dims, _ in mf.tensor_specs(shape)}
    tensors = {}
    for folder in folders:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(specs)
        got = {}
        for shard in sorted(set(index["weight_map"].values())):
            with safe_open(str(folder / shard), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                for k in f.keys():
                    assert index["weight_map"][k] == shard
                    got[k] = f.get_tensor(k)
        assert {k: tuple(v.shape) for k, v in got.items()} == specs
        assert all(v.dtype == torch.bfloat16 for v in got.values())
        assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in got.values())
        tensors[folder.name] = got
    from transformers import LlamaConfig

    assert LlamaConfig.from_pretrained(folders[1]).num_hidden_layers == 3
    base = tensors["base"]
    name = "model.layers.2.mlp.up_proj.weight"
    assert abs(float(base[name].float().std()) - 0.02) < 0.002
    assert abs(float(base["model.norm.weight"].float().mean()) - 1.0) < 0.02
    for t, task in enumerate(("task_a", "task_b", "task_c")):
        delta = tensors[task][name].float() - base[name].float()
        assert float(delta.std()) == pytest.approx(mf.task_scale(t, 2, 3), rel=0.1)
