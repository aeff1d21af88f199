"""mergekit's `model+adapter` references: a model with a LoRA adapter merged into it.

`X+A` is model X with adapter A applied — for the base and for any model, as mergekit reads it.
The plan reads X's headers (the tensors are X's, same names and shapes). Before the merge, each
of X's shards is rewritten once into a cache folder (`$HF_HOME/hf-metagpt/lora-applied/<key>`,
one shard in memory at a time), each adapted weight becoming W + s·(B·A) computed in float32 and
rounded once to W's dtype — the arithmetic mergekit 0.1.5 gets from peft's merge (checked bit for
bit on tiny models); the merge then reads that folder like any model. A rerun finds it there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from .model import ModelInfo
from .refs import ModelRef

log = logging.getLogger(__name__)

DONE = "hf_metagpt_lora_applied.json"


def split(spec: str) -> tuple[str, str] | None:
    """(model, adapter) of `model+adapter`; None for a plain reference (or a folder whose name has '+')."""
    text = str(spec)
    if "+" not in text or Path(text).expanduser().exists():
        return None
    model, _, adapter = text.partition("+")
    if not model.strip() or not adapter.strip():
        raise InputError(f"Model {text!r}: `model+adapter` needs both parts.",
                         hint="Write e.g. org/model+org/lora-adapter.")
    return model.strip(), adapter.strip()


def applied_info(spec: str, model: ModelInfo, adapter: ModelInfo) -> ModelInfo:
    """What the plan reads for `X+A`: X's headers, named `X+A`, remembering the adapter."""
    if model.ref.is_adapter:
        raise InputError(f"{spec}: {model.name} is itself an adapter; the part before '+' must be a full model.")
    if not adapter.ref.is_adapter:
        raise InputError(f"{spec}: {adapter.name} is not a PEFT LoRA adapter (no adapter_config.json).",
                         hint="The part after '+' must be a LoRA adapter of the model before it.")
    missing = [p for p in (*adapter.lora, *adapter.full) if p not in model.tensors]
    if missing:
        raise InputError(f"{spec}: the adapter updates {missing[0]!r}, which {model.name} does not have.",
                         hint="Apply the adapter to the model it was trained on.")
    return replace(model, ref=replace(model.ref, spec=spec), lora_applied=adapter)


def _folder(info: ModelInfo, token: str | None) -> Path:
    if info.ref.local_path is not None:
        return info.ref.local_path
    from huggingface_hub import snapshot_download

    from .hub_calls import call, tok

    return Path(call(info.name, snapshot_download, info.ref.repo_id, revision=info.ref.sha, token=tok(token)))


def _key(info: ModelInfo, adapter: ModelInfo, mfolder: Path, afolder: Path) -> str:
    def ident(i: ModelInfo, folder: Path) -> list:
        if i.ref.sha:
            return [i.ref.repo_id, i.ref.sha]
        return [str(folder), *[[f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] for f in i.weight_files]]
    return hashlib.sha256(json.dumps([ident(info, mfolder), ident(adapter, afolder)]).encode()).hexdigest()[:24]


def materialize(info: ModelInfo, token: str | None = None) -> ModelInfo:
    """`X+A` as a local model folder (made once, reused), read like any input."""
    from huggingface_hub import constants
    from safetensors.torch import load_file, save_file

    from .local import load_local_info

    adapter = info.lora_applied
    mfolder = _folder(info, token)
    afolder = _folder(adapter, token)
    dest = Path(constants.HF_HOME) / "hf-metagpt" / "lora-applied" / _key(info, adapter, mfolder, afolder)
    if not (dest / DONE).is_file():
        log.info("applying %s to %s (once; kept in %s)", adapter.name, info.name, dest)
        part = dest.with_name(dest.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        factors = load_file(afolder / "adapter_model.safetensors")
        for file in info.weight_files:
            state = load_file(mfolder / file)
            for name in list(state):
                w = state[name]
                if name in adapter.full:
                    state[name] = factors[adapter.full[name]].to(w.dtype)
                if name in adapter.lora:
                    m = adapter.lora[name]
                    delta = factors[m.b_key].float() @ factors[m.a_key].float()
                    delta = (delta.t() if m.transposed else delta) * m.scale
                    state[name] = (state[name].float() + delta).to(w.dtype)
            save_file(state, part / file, metadata={"format": "pt"})
            del state
        for side in mfolder.iterdir():
            if side.is_file() and not side.name.endswith(".safetensors"):
                shutil.copyfile(side, part / side.name)
        (part / DONE).write_text(json.dumps({"model": info.ref.pinned, "adapter": adapter.ref.pinned}))
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
    local = load_local_info(ModelRef(spec=info.ref.spec, local_path=dest))
    return replace(local, ref=replace(info.ref, local_path=dest, repo_id=None, sha=None))
