"""The output folder: checks before anything runs, a work folder beside it, an atomic swap at the end.

A merge writes into `.NAME.hf-metagpt-partial/` next to the target and renames it into place only
when every file is written, so an interrupted run never leaves a folder that looks complete. The
work folder is keyed by the plan: a rerun of the same merge resumes from its finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..sources.local import INDEX_FILE, TOKENIZER_FILES
from ..sources.model import ModelInfo
from .plan import MergePlan

log = logging.getLogger(__name__)

PLAN_KEY_FILE = "hf_metagpt_plan.json"
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class OutputDirs:
    target: Path
    work: Path
    resumed: bool = False


def check_output(target: Path, inputs: list[ModelInfo], overwrite: bool) -> None:
    """Refuse outputs that would lose data: non-empty without --overwrite, or overlapping an input."""
    target = target.expanduser().resolve()
    for info in inputs:
        src = info.ref.local_path
        if src is None:
            continue
        src = src.resolve()
        if target == src or src in target.parents:
            raise OutputError(f"The output folder {target} is inside the input model {info.name}.",
                              hint="Choose an output folder outside every input folder.")
        if target in src.parents:
            raise OutputError(f"The input model {info.name} is inside the output folder {target}.",
                              hint="Choose an output folder that does not contain the inputs.")
    if target.exists() and not target.is_dir():
        raise OutputError(f"The output {target} exists and is a file.", hint="Choose a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"The output folder {target} is not empty.",
                          hint="Pass --overwrite to replace it, or choose another folder.")


def fingerprint(info: ModelInfo) -> list[Any]:
    """Identity of an input: its commit SHA on the Hub, else each weight file's size and mtime."""
    if info.ref.sha:
        return [info.ref.repo_id, info.ref.sha]
    out: list[Any] = [str(info.ref.local_path)]
    for f in info.weight_files:
        st = (info.files_dir / f).stat()  # type: ignore[operator]
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def norms_key(plan: MergePlan, method_name: str, params: dict[str, Any], seed: int | None) -> str:
    """What the squared norms depend on: inputs, method and its parameters, granularity, seed."""
    return _digest({"inputs": [fingerprint(i) for i in plan.inputs], "method": method_name,
                    "params": params, "seed": seed, "granularity": plan.options.granularity,
                    "tokenizer_source": plan.tokenizer_source})


def plan_key(plan: MergePlan, nkey: str) -> str:
    """What the output bytes depend on: the norms' key plus the output layout."""
    layout = [[s.file, [[t.name, t.out_dtype, list(t.out_shape)] for t in s.tensors]] for s in plan.shards]
    return _digest({"norms": nkey, "layout": layout})


def work_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.hf-metagpt-partial"


def prepare(target: Path, key: str) -> OutputDirs:
    """Create (or resume) the work folder for this plan."""
    target = target.expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = work_dir_for(target)
    key_file = work / PLAN_KEY_FILE
    if work.is_dir():
        try:
            same = json.loads(key_file.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if same:
            log.info("Resuming an interrupted merge from %s", work)
            return OutputDirs(target, work, resumed=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    key_file.write_text(json.dumps({"key": key}))
    return OutputDirs(target, work)


def write_side_files(plan: MergePlan, work: Path) -> None:
    """Index, config, generation config and tokenizer files next to the shards."""
    weight_map = {t.name: plan.shards[t.shard].file for t in plan.tensors}
    index = {"metadata": {"total_size": plan.bytes_to_write}, "weight_map": weight_map}
    (work / INDEX_FILE).write_text(json.dumps(index, indent=2))

    config = dict(plan.base.config)
    dtype = _DTYPE_NAMES.get(plan.out_dtype, "float32")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    for t in plan.tensors:
        if t.name.endswith("embed_tokens.weight"):
            config["vocab_size"] = t.out_shape[0]
    (work / "config.json").write_text(json.dumps(config, indent=2))

    base_dir = plan.base.ref.local_path
    gen = base_dir / "generation_config.json" if base_dir else None
    if gen is not None and gen.is_file():
        shutil.copyfile(gen, work / "generation_config.json")
    else:
        _default_generation_config(config, work)

    tok_info = plan.inputs[plan.tokenizer_source]
    tok_dir = tok_info.ref.local_path
    copied = []
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, work / name)
                copied.append(name)
    if not copied:
        log.warning("No tokenizer files found in %s; the output has no tokenizer.", tok_info.name)


def _default_generation_config(config: dict[str, Any], work: Path) -> None:
    from transformers import GenerationConfig

    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    GenerationConfig(**{k: config[k] for k in keys if config.get(k) is not None}).save_pretrained(work)


def publish(dirs: OutputDirs) -> Path:
    """Swap the finished work folder into place (the old output is removed only after)."""
    target, work = dirs.target, dirs.work
    (work / PLAN_KEY_FILE).unlink(missing_ok=True)
    for leftover in [*work.glob(NORM_STATES), *work.glob("*.tmp")]:
        leftover.unlink()
    old = None
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            old = target.parent / f".{target.name}.hf-metagpt-old"
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def cached_norms(target: Path, key: str) -> dict[str, list[float]] | None:
    """Squared norms from a finished output of the same inputs (a rerun or push retry skips pass 1)."""
    from ..result import COEFFICIENTS_FILE

    path = target / COEFFICIENTS_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("norms_key") != key:
            return None
        return {g: [float(x) for x in v["sq_norms"]] for g, v in data["groups"].items() if v.get("sq_norms") is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return None


NORM_STATE = "norms.partial.json"


NORM_STATES = "norms.partial*.json"  # one process's NORM_STATE, or each process's of a shared merge
