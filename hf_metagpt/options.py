"""Merge options, and YAML recipes that hold them.

`MergeOptions` is the one source of truth for what a merge can be told: the CLI flags, the
recipe keys and the Python keyword arguments all map onto its fields by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

GRANULARITIES = ("model", "layer", "tensor")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_FORMATS = ("model", "lora")


@dataclass
class MergeOptions:
    """Everything a merge is told. Field names are the recipe keys and the CLI flags."""

    base: str = ""
    models: list[str] = field(default_factory=list)
    output: str = ""
    method: str = "metagpt"
    #: method parameters, e.g. {"density": 0.5} for TIES/DARE or {"weights": [...]} for linear
    parameters: dict[str, Any] = field(default_factory=dict)
    granularity: str = "model"
    #: "base" or one of the fine-tunes (as written in `models`): whose vocabulary and tokenizer
    tokenizer_source: str = "base"
    dtype: str = "auto"
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    seed: int = 0
    allow_nonfinite: bool = False
    #: refuse a LoRA adapter whose base_model_name_or_path names another base (default: warn)
    strict: bool = False
    #: "model" (full weights, default) or "lora" (one merged adapter; every input must be a LoRA adapter)
    output_format: str = "model"
    #: with output_format lora: compress each module's merged update to this rank (truncated SVD)
    lora_rank: int | None = None
    # Hub side ([hub]): all optional for local merges.
    token: str | None = field(default=None, repr=False)
    push_to: str | None = None
    private: bool = False
    create_pr: bool = False
    revision: str | None = None
    commit_message: str | None = None
    low_disk: bool = False
    #: merge inputs that have only pickle weights (pytorch_model*.bin), converted with torch's weights-only loader
    allow_pickle: bool = False

    def validate(self) -> None:
        """Check values that do not depend on the models (before anything is read)."""
        if not self.base:
            raise RecipeError("No base model given.", hint="Pass --base MODEL (or `base:` in the recipe).")
        if not self.models:
            raise RecipeError(
                "No fine-tuned model given: MetaGPT needs at least one fine-tune of the base.",
                hint="List one or more fine-tunes after --base BASE.",
            )
        if not self.output and not self.push_to:
            raise RecipeError("No output folder given.", hint="Pass --output DIR (or `output:` in the recipe).")
        for name, allowed in (("granularity", GRANULARITIES), ("dtype", DTYPES), ("device", DEVICES),
                              ("output_format", OUTPUT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise RecipeError(
                    f"Invalid {name} {getattr(self, name)!r}.", hint=f"Use one of: {', '.join(allowed)}."
                )
        parse_size(self.max_shard_size)
        if self.lora_rank is not None:
            if self.output_format != "lora":
                raise RecipeError("lora_rank only applies to output_format lora.",
                                  hint="Add --output-format lora, or drop --lora-rank.")
            if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
                raise RecipeError(f"Invalid lora_rank {self.lora_rank!r}.", hint="Use a positive integer.")

    def to_recipe(self) -> dict[str, Any]:
        """The options as a recipe dict (secrets and defaults left out), for the card and reruns."""
        out: dict[str, Any] = {}
        defaults = MergeOptions()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "token" or value == getattr(defaults, f.name):
                continue
            out[f.name] = value
        return out


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (transformers' convention: decimal units, KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        if size <= 0:
            raise RecipeError(f"Invalid size {size}.", hint="Use a positive size like 5GB or 500MB.")
        return size
    text = str(size).strip().upper().replace(" ", "")
    num = text.rstrip("KMGTIB")
    unit = text[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    # inf/nan and sizes under one byte ('1e-9') are refused here rather than crash or mean 0 later.
    if unit not in _UNITS or not math.isfinite(value) or value * _UNITS[unit] < 1:
        raise RecipeError(f"Invalid size {size!r}.", hint="Use a size like 5GB, 500MB or 2GiB.")
    return int(value * _UNITS[unit])


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return isinstance(value, annotation)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into checked option values (unknown keys and wrong types name their line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"Cannot read recipe {path}: {exc.strerror}.") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> dict[str, Any]:
    """Parse recipe text; errors name the key and its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"Recipe {source} is nested too deeply to be a recipe.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"Recipe {source} must be a mapping of option names to values.")
    lines: dict[Any, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode):
            continue
        try:  # the key as safe_load sees it (1, null, ...), so every key's line is known
            key = yaml.SafeLoader("").construct_object(k)
        except yaml.YAMLError:
            key = k.value
        if key in lines:
            raise RecipeError(f"Recipe key {key!r} is given twice ({source}, lines {lines[key]} and "
                              f"{k.start_mark.line + 1}).", hint="Keep one of them.")
        lines[key] = k.start_mark.line + 1
    hints = typing.get_type_hints(MergeOptions)
    known = {f.name for f in dataclasses.fields(MergeOptions)}
    aliases = {"fine_tunes": "models", "finetunes": "models"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(str(key), str(key)).replace("-", "_")
        where = f"{source}, line {lines.get(key, '?')}"
        if name == "token":
            raise RecipeError(f"Recipe key 'token' ({where}) is not allowed: recipes are shared, tokens are secret.",
                              hint="Use HF_TOKEN, `hf auth login` or --token instead.")
        if name not in known:
            raise RecipeError(f"Unknown recipe key {key!r} ({where}).",
                              hint=f"Known keys: {', '.join(sorted(known - {'token'}))}.")
        if name == "max_shard_size" and isinstance(value, int):
            value = str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and hints[name] is str:
            value = str(value)
        if not _type_ok(value, hints[name]):
            raise RecipeError(f"Recipe key {key!r} ({where}) has the wrong type: {type(value).__name__}.",
                              hint=f"Expected {_describe(hints[name])}.")
        out[name] = value
    return out


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_options(recipe: str | Path | None = None, **overrides: Any) -> MergeOptions:
    """Options from a recipe file (if any) with explicit values on top (None means 'not given')."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    for key, value in overrides.items():
        if value is not None and value != [] :
            values[key] = value
    opts = MergeOptions(**values)
    opts.validate()
    return opts


def dump_recipe(opts: MergeOptions) -> str:
    """YAML text of a recipe that reproduces these options."""
    return yaml.safe_dump(opts.to_recipe(), sort_keys=False)
