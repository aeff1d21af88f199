"""A model in a local folder: its weight files (index or single file) and their safetensors headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..safetensors_io import TensorMeta, read_header
from .model import ModelInfo
from .refs import ModelRef

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def read_config(ref: ModelRef) -> dict:
    """The config.json of a local model folder, or a clear error."""
    folder = ref.local_path
    assert folder is not None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{ref.display}: no config.json in {ref.spec}.",
                         hint="Point at a transformers model folder (save_pretrained output).")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{ref.display}: config.json is not valid JSON ({exc}).") from None
    return check_config(config, ref.display)


#: config.json fields the plan compares or reads, which must be counts when present
CONFIG_COUNTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "head_dim", "vocab_size")


def check_config(config: Any, model: str) -> dict[str, Any]:
    """A model's parsed config.json, when it is a JSON object whose fields the plan reads have their
    types (a string where a count belongs would compare as different, or crash a check)."""
    hint = "The model's config.json is damaged or hand-edited wrongly; fix it or re-download the model."
    if not isinstance(config, dict):
        raise InputError(f"{model}: config.json holds a {type(config).__name__}, not a JSON object.", hint=hint)
    arch = config.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) and a for a in arch)):
        raise InputError(f"{model}: config.json field 'architectures' must be a list of class names "
                         f"(e.g. [\"LlamaForCausalLM\"]), got {arch!r}.", hint=hint)
    for key in ("model_type",):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise InputError(f"{model}: config.json field {key!r} must be text, got {config[key]!r}.", hint=hint)
    for key in CONFIG_COUNTS:
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise InputError(f"{model}: config.json field {key!r} must be a whole number, got {v!r} "
                             f"({type(v).__name__}).", hint=hint)
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise InputError(f"{model}: config.json field 'tie_word_embeddings' must be true or false, got {tie!r}.",
                         hint=hint)
    return config


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def load_local_info(ref: ModelRef) -> ModelInfo:
    """Config and tensor headers of a local model folder (no tensor data read).

    Pickle-only folders are refused here; `sources.pickle.load_pickle_info` reads them when the
    user allows pickle (`--allow-pickle`).
    """
    folder = ref.local_path
    assert folder is not None
    config = read_config(ref)
    files, index = local_weight_files(folder, ref.display)
    tensors: dict[str, TensorMeta] = {}
    for rel in files:
        try:
            header = read_header(folder / rel, rel)
        except InputError as exc:  # name the model too: the same shard name exists in every input
            raise InputError(f"{ref.display}: {exc.message}", hint=exc.hint) from None
        for name, meta in header.items():
            if name in tensors:
                raise InputError(f"{ref.display}: tensor {name!r} is stored twice ({tensors[name].file}, {rel}).")
            tensors[name] = meta
    if index is not None:
        check_index(index, ref.display, tensors)
    return ModelInfo(ref=ref, config=config, tensors=tensors, weight_files=files)


def safe_relative(name: str, model: str) -> str:
    """Refuse index entries that point outside the model folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or "\0" in name or p.as_posix() == ".":
        raise InputError(f"{model}: the weight index names a file outside the model: {name!r}.",
                         hint="The index is damaged or malicious; re-download the model.")
    return p.as_posix()


def weight_files_from_index(index: dict[str, Any], model: str) -> list[str]:
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{model}: {INDEX_FILE} has no weight_map.", hint="Re-download or re-save the model.")
    bad = [f for f in wm.values() if not isinstance(f, str)]
    if bad:
        raise InputError(f"{model}: {INDEX_FILE} names a file that is not a string: {bad[0]!r}.",
                         hint="The index is damaged; re-download or re-save the model.")
    return sorted({safe_relative(f, model) for f in wm.values()})


def local_weight_files(folder: Path, model: str) -> tuple[list[str], dict[str, Any] | None]:
    """The weight files of a local model, and its parsed index when it has one."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:
            raise InputError(f"{model}: {INDEX_FILE} is not valid JSON ({exc}).") from None
        files = weight_files_from_index(index, model)
        for f in files:
            if not (folder / f).is_file():
                raise InputError(f"{model}: shard {f} named in {INDEX_FILE} is missing.",
                                 hint="Re-download the model (an interrupted download?).")
        return files, index
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    pickles = [p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat)]
    if pickles:
        raise InputError(
            f"{model}: only pickle weights ({', '.join(sorted(pickles)[:3])}); hf-metagpt does not unpickle "
            f"files unless told to.",
            hint="Pass --allow-pickle (recipe key allow_pickle) to convert them to safetensors with torch's "
                 "weights-only loader (a pickle that would run code is still refused), or convert them yourself.",
        )
    raise InputError(f"{model}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) found.",
                     hint="Point at a folder holding the model's *.safetensors files.")


def check_index(index: dict[str, Any], model: str, tensors: dict[str, TensorMeta]) -> None:
    """The (parsed) index and the shards' headers must agree (a stale index makes a broken merge)."""
    for name, file in index.get("weight_map", {}).items():
        meta = tensors.get(name)
        if meta is None or meta.file != Path(file).as_posix():
            raise InputError(f"{model}: {INDEX_FILE} places {name!r} in {file}, but that shard does not hold it.",
                             hint="The index is stale or damaged; re-download the model.")


def side_file(folder: Path, name: str, model: str) -> Path | None:
    """A model's side file (tokenizer, generation config) to copy into a merge, or None when it has none.

    The file may be a link into the model folder, or, in a Hub cache snapshot, into that repository's
    `blobs/`; a link anywhere else is refused: whatever it points at would be copied into the merge
    and pushed with it.
    """
    path = folder / name
    if not path.is_file():  # absent, a folder, a device or a dangling link: nothing to copy
        return None
    root = folder.resolve()
    real = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<sha>/NAME -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise InputError(f"{model}: {name} is a link to {real}, outside the model folder {root}.",
                         hint="Copy the file into the model folder in place of the link (or remove it): side files "
                              "are copied into the merge and pushed with it, so only files inside a model are used.")
    return path


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
