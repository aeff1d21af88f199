"""Repos that hold more than the HF weights: only the weight index's files (or model.safetensors) are read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from helpers import shards

#: files real fine-tune repos carry beside their weights, none of which a merge needs
EXTRAS = ["consolidated.safetensors", "original/consolidated.00.pth", "original/params.json", "model-q4_k_m.gguf",
          "adapter_config.json", "adapter_model.safetensors", "training_args.bin", "optimizer.pt", "scheduler.pt",
          "checkpoint-100/model.safetensors", "checkpoint-100/config.json", "checkpoint-100/optimizer.pt",
          "pytorch_model.bin"]


def add_extras(folder: Path) -> None:
    """Mistral's consolidated file, Llama 3's original/, a GGUF, an adapter, trainer states, a checkpoint."""
    state = {k: v for p in folder.glob("model*.safetensors") for k, v in load_file(p).items()}
    save_file({k.replace("model.", ""): v.clone() for k, v in state.items()}, folder / "consolidated.safetensors")
    (folder / "original").mkdir()
    torch.save({"tok_embeddings.weight": state["model.embed_tokens.weight"]}, folder / "original/consolidated.00.pth")
    (folder / "original/params.json").write_text(json.dumps({"dim": 64}))
    (folder / "model-q4_k_m.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
              folder / "adapter_model.safetensors")
    torch.save({"lr": 1e-5}, folder / "training_args.bin")
    torch.save({"state": os.urandom(2048)}, folder / "optimizer.pt")
    torch.save({"step": 3}, folder / "scheduler.pt")
    (folder / "checkpoint-100").mkdir()
    save_file({"w": torch.zeros(64)}, folder / "checkpoint-100/model.safetensors")
    shutil.copy(folder / "config.json", folder / "checkpoint-100/config.json")
    torch.save({"state": os.urandom(2048)}, folder / "checkpoint-100/optimizer.pt")
    torch.save(state, folder / "pytorch_model.bin")  # the pickle twin some repos still carry


@pytest.fixture(scope="module", params=["100KB", "50MB"], ids=["index", "single"])
def cluttered(request, tmp_path_factory, hub_user):
    root = tmp_path_factory.mktemp(f"extras-{request.param}")
    base, fts = build_family(root, n_models=2, spec=TinySpec(max_shard_size=request.param))
    folders = [base, *fts]
    clean = root / "merged-clean"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(clean), device="cpu", progress=False)
    api = HfApi()
    tag = os.urandom(3).hex()
    ids = []
    for f in folders:
        add_extras(f)
        repo = f"{hub_user}/extras-{tag}-{f.name}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=f, commit_message="weights and more")
        ids.append(repo)
    return folders, ids, clean


def _files_read(requests, ids) -> set[str]:
    """Repo files the client got (HEAD or GET, whole or ranged; a probe answered 404 reads nothing)."""
    out = set()
    for r in requests:
        if r.status is not None and r.status >= 400:
            continue
        for i in ids:
            prefix = f"/{i}/resolve/"
            if r.path.startswith(prefix):
                out.add(r.path[len(prefix):].split("/", 1)[1])
    return out


def _weights(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"].values()) | {index.name}
    return {"model.safetensors"}


def test_plan_reads_only_the_weight_headers_of_a_cluttered_repo(cluttered, local_hub):
    folders, ids, _ = cluttered
    local_hub.clear_requests()
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    read = _files_read(local_hub.requests, ids)
    assert read and read <= _weights(folders[0]) | {"config.json"}, read
    assert not any(r.method == "GET" and "/resolve/" in r.path and not r.range and r.path.endswith(".safetensors")
                   for r in local_hub.requests), "plan downloaded a whole weight file"
    assert plan.base.weight_files == sorted(_weights(folders[0]) - {"model.safetensors.index.json"})
    assert not any(m.ref.is_adapter for m in plan.models)


def test_merge_of_a_cluttered_repo_downloads_no_extra_file_and_equals_the_clean_merge(cluttered, local_hub, tmp_path):
    folders, ids, clean = cluttered
    local_hub.clear_requests()
    out = tmp_path / "o"
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False)
    read = _files_read(local_hub.requests, ids)
    assert not read & set(EXTRAS), read & set(EXTRAS)
    side = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"}
    assert read <= _weights(folders[0]) | side, read - _weights(folders[0]) - side
    assert shards(out) == shards(clean)
    assert not any((out / e).exists() for e in EXTRAS)


def test_a_local_folder_with_an_adapter_beside_full_weights_is_the_full_model(cluttered, tmp_path):
    folders, _, clean = cluttered
    out = tmp_path / "o"
    result = hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(out),
                              device="cpu", progress=False)
    assert not any(m.is_adapter for m in result.models)
    assert shards(out) == shards(clean)
