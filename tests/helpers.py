"""Small helpers shared by the test files (no merge logic: see reference.py for that)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from hf_metagpt.cli import main as cli_main

#: repo names of a tiny family published to the local Hub (base and two fine-tunes)
NAMES = ["base", "chat", "math"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `hf-metagpt -q ARGS` in-process; (exit code, stdout, stderr) of that run only."""
    capsys.readouterr()  # drop what building the fixtures printed
    code = cli_main(["-q", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder to edit (kept when it exists: module fixtures reuse it)."""
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def add_tokens(src: Path, dst: Path, n: int) -> Path:
    """A copy of model `src` with `n` more vocabulary rows (random embedding and lm_head rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    old = model.config.vocab_size
    model.resize_token_embeddings(old + n)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = torch.randn(n, model.config.hidden_size).to(model.dtype)
        model.get_output_embeddings().weight[old:] = torch.randn(n, model.config.hidden_size).to(model.dtype)
    model.save_pretrained(dst, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def digest(state: dict[str, torch.Tensor]) -> str:
    """The first 16 hex digits of a sha256 over a state dict's names, dtypes, shapes and bytes (how
    the stored digests of mergekit's outputs in tests/methods were recorded)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def merge_family(family: tuple[Path, list[Path]], out: Path, **kw):
    """`hf_metagpt.merge` of a (base, fine-tunes) family on the CPU into `out`, no progress bars."""
    import hf_metagpt

    base, fts = family
    return hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu",
                            progress=False, **kw)


def shards(folder: Path) -> dict[str, bytes]:
    """Every safetensors shard of a folder, by name: two merges are compared byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def publish(folders: list[Path], user: str, prefix: str) -> list[str]:
    """Fresh local-Hub repos per test: nothing of them is in the Hub cache, so every file really travels."""
    from huggingface_hub import HfApi

    api = HfApi()
    ids = []
    for name, folder in zip(NAMES, folders):
        repo = f"{user}/{prefix}-{name}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"tiny {name}")
        ids.append(repo)
    return ids
