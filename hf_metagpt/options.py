"""Merge options, and YAML recipes that hold them.

`MergeOptions` is the one source of truth for what a merge can be told: the CLI flags, the
recipe keys and the Python keyword arguments all map onto its fields by name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from .errors import InputError, RecipeError
from .dtype_names import CONFIG_TO_ST

if TYPE_CHECKING:
    from .sources.refs import ModelRef

GRANULARITIES = ("model", "layer", "tensor")
DTYPES = ("auto", *CONFIG_TO_ST)
#: auto: mergekit's arithmetic for a mergekit recipe, ours otherwise; mergekit; own (float64 sums)
ARITHMETICS = ("auto", "mergekit", "own")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_FORMATS = ("model", "lora")


#: fields that name a path (or a model reference that may be one): `os.PathLike` becomes `str`
_PATH_FIELDS = ("base", "output", "tokenizer_source")


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_push_options(push_to: str | None, *, create_pr: bool = False, revision: str | None = None) -> None:
    """Refuse push options that cannot work together, before anything is read or merged.

    A pull request is always opened against the default branch (huggingface_hub raises a
    ValueError for `create_pr` with another `revision` — after the whole merge, when this is not
    checked first); `--create-pr` and `--revision` mean nothing without somewhere to push.
    """
    if create_pr and revision not in (None, "", "main"):
        raise InputError(f"--create-pr cannot be combined with --revision {revision} (create_pr=True with "
                         f"revision={revision!r}): a pull request is always opened against main.",
                         hint=f"Drop --revision to open a pull request against main, or drop --create-pr to "
                              f"commit to the branch {revision!r}.")
    if not push_to and (create_pr or revision):
        what = "--create-pr (create_pr=True)" if create_pr else f"--revision {revision} (revision=...)"
        raise InputError(f"{what} only applies to a push, and no --push-to (push_to=...) was given.",
                         hint="Add --push-to ORG/NAME, or drop the option.")


@dataclass
class MergeOptions:
    """Everything a merge is told. Field names are the recipe keys and the CLI flags.

    Paths (`base`, `models`, `output`, `tokenizer_source`) may be given as `str` or `os.PathLike`
    (e.g. `pathlib.Path`); they are kept as `str`, so recipes and cards can be written from them.
    """

    base: str = ""
    models: list[str] = field(default_factory=list)
    output: str = ""
    method: str = "metagpt"
    #: method parameters, e.g. {"density": 0.5} for TIES/DARE or {"weights": [...]} for linear
    parameters: dict[str, Any] = field(default_factory=dict)
    granularity: str = "model"
    #: "base" or one of the fine-tunes (as written in `models`): whose vocabulary and tokenizer
    tokenizer_source: str = "base"
    #: mergekit's tokenizer sources: "tokenizer" (the output's vocabulary rows are the tokenizer source's
    #: tokens) or "union" (every input's tokens; `sources/vocab.py`); None: the rows of the embeddings
    vocabulary: str | None = None
    #: the output tokenizer's chat template: None (the tokenizer source's; the fine-tunes' when it has
    #: none), "auto" (the most common), "chatml"/"llama3"/"alpaca"/"mistral"/"exaone", one of the models, or the template text
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    seed: int = 0
    allow_nonfinite: bool = False
    #: refuse a LoRA adapter whose base_model_name_or_path names another base (default: warn)
    strict: bool = False
    #: mergekit `slices:`: output layer j of input i reads its layer layers[i][j] (one map per input, the
    #: base first); None reads every layer as it is (`engine/layers.py`)
    layers: list[list[int]] | None = None
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
    #: "mergekit": mergekit 0.1.5's steps in the compute dtype (its bytes; what a mergekit recipe gets
    #: with "auto"), "own": hf-metagpt's float64 sums; see `method_parameters`
    arithmetic: str = "auto"

    def __post_init__(self) -> None:
        _normalise_paths(self)

    def validate(self, for_merge: bool = True) -> None:
        """Check values that do not depend on the models (before anything is read).

        Args:
            for_merge: also require somewhere to write (`output` or `push_to`); `plan()` passes
                False, since laying out a merge writes nothing.

        Raises:
            RecipeError: a missing or invalid value, with a hint for the CLI and the Python API.
        """
        _normalise_paths(self)  # fields may have been assigned after construction
        if isinstance(self.method, str):  # `--method TIES`, `dare-linear`: the names are lower case with `_`
            self.method = self.method.strip().lower().replace("-", "_")
        if not isinstance(self.parameters, dict):
            raise TypeError(f"parameters must be a dict of method parameters, such as {{'density': 0.5}} or "
                            f"{{'weights': [0.3, 0.7]}}, not {type(self.parameters).__name__} {self.parameters!r}")
        if not self.base:
            raise RecipeError("No base model given.",
                              hint="Pass --base MODEL (base=... in Python, `base:` in a recipe).")
        if not self.models:
            raise RecipeError(
                "No fine-tuned model given: MetaGPT needs at least one fine-tune of the base.",
                hint="List one or more fine-tunes after --base BASE (models=[...] in Python, `models:` in a recipe).",
            )
        if for_merge and not self.output and not self.push_to:
            raise RecipeError("No output folder given.",
                              hint="Pass --output DIR (output=... in Python, `output:` in a recipe), "
                                   "or --push-to ORG/NAME (push_to=...).")
        for name, allowed in (("granularity", GRANULARITIES), ("dtype", DTYPES), ("device", DEVICES),
                              ("output_format", OUTPUT_FORMATS), ("arithmetic", ARITHMETICS)):
            if getattr(self, name) not in allowed:
                raise RecipeError(
                    f"Invalid {name} {getattr(self, name)!r}.", hint=f"Use one of: {', '.join(allowed)}."
                )
        parse_size(self.max_shard_size)
        if self.vocabulary not in (None, "tokenizer", "union"):
            raise RecipeError(f"Invalid vocabulary {self.vocabulary!r}.", hint="Use tokenizer or union (or leave it out).")
        if self.chat_template is not None:
            from .sources.chat_template import check_choice

            check_choice(self.chat_template)
        if self.push_to is not None:
            check_repo_id(self.push_to, "--push-to", "push_to")
        elif for_merge:
            given = [flag for flag, name in (("--create-pr", "create_pr"), ("--private", "private"),
                                             ("--revision", "revision"), ("--commit-message", "commit_message"))
                     if getattr(self, name) not in (None, False)]
            if given:
                raise RecipeError(f"{given[0]} only applies to a push, and no --push-to was given.",
                                  hint="Add --push-to ORG/NAME (push_to=... in Python), or drop "
                                       + " and ".join(given) + ".")
        if self.layers is not None:
            from .engine.layers import check_layers

            check_layers(self.layers, 1 + len(self.models))
        check_push_options(self.push_to, create_pr=self.create_pr, revision=self.revision)
        if self.lora_rank is not None:
            if self.output_format != "lora":
                raise RecipeError("lora_rank only applies to output_format lora.",
                                  hint="Add --output-format lora (output_format=\"lora\"), or drop --lora-rank (lora_rank=...).")
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


def method_parameters(opts: MergeOptions) -> dict[str, Any]:
    """The method's parameters with `arithmetic` applied: "own" drops a mergekit recipe's
    `mergekit_order`; "mergekit" sets it (the recipe's dtype, else the inputs') where the method has it."""
    params = dict(opts.parameters)
    if opts.arithmetic == "own":
        params.pop("mergekit_order", None)
    elif opts.arithmetic == "mergekit" and not params.get("mergekit_order"):
        from .methods.mergekit_order import METHODS

        if opts.method not in METHODS:
            raise RecipeError(f"arithmetic mergekit: mergekit has no method {opts.method!r}.",
                              hint=f"mergekit's arithmetic applies to {', '.join(METHODS)}; use --arithmetic own.")
        params["mergekit_order"] = opts.dtype if opts.dtype != "auto" else "auto"
    return params


class MergeKwargs(typing.TypedDict, total=False):
    """The keyword arguments of `merge()` and `plan()`: the fields of `MergeOptions` and the recipe
    to start from, typed for editors and type checkers (a test keeps them the same). Paths may be
    `os.PathLike`."""

    base: str | os.PathLike[str]
    models: Sequence[str | os.PathLike[str]]
    output: str | os.PathLike[str]
    method: str
    parameters: dict[str, Any]
    granularity: str
    tokenizer_source: str | os.PathLike[str]
    vocabulary: str | None
    chat_template: str | None
    dtype: str
    device: str
    max_shard_size: str | int
    overwrite: bool
    seed: int
    allow_nonfinite: bool
    strict: bool
    layers: list[list[int]] | None
    output_format: str
    lora_rank: int | None
    token: str | None
    push_to: str | None
    private: bool
    create_pr: bool
    revision: str | None
    commit_message: str | None
    low_disk: bool
    allow_pickle: bool
    arithmetic: str
    #: a YAML recipe (ours or mergekit's) the options start from; the keywords above win over it
    recipe: str | os.PathLike[str]
    #: how to read `recipe`: "auto" (mergekit's when it has a `merge_method` key), "hf-metagpt" or "mergekit"
    recipe_format: str


#: the `MergeKwargs` keys that are not `MergeOptions` fields (they say where the options come from)
RECIPE_KEYS = ("recipe", "recipe_format")


class InspectKwargs(typing.TypedDict, total=False):
    """The keyword arguments of `inspect()`: the inputs as `merge()` and `plan()` take them (same
    names, same types) and the options that change what is measured; nothing is written."""

    base: str | os.PathLike[str]
    models: Sequence[str | os.PathLike[str]]
    recipe: str | os.PathLike[str]
    recipe_format: str
    granularity: str
    tokenizer_source: str | os.PathLike[str]
    token: str | None
    device: str
    strict: bool
    low_disk: bool


def _normalise_paths(opts: MergeOptions) -> None:
    """PathLike -> str in the fields that hold paths (in place: the dataclass is the caller's)."""
    for name in _PATH_FIELDS:
        value = getattr(opts, name)
        if isinstance(value, os.PathLike):
            setattr(opts, name, os.fspath(value))
    models = opts.models
    if isinstance(models, (str, os.PathLike)):
        raise RecipeError(f"models must be a list of models, not one {type(models).__name__} ({models!r}).",
                          hint="Pass models=[\"chat/\", \"math/\"] (a list, even of one).")
    if models is not None and not isinstance(models, list) or any(isinstance(m, os.PathLike) for m in models or ()):
        opts.models = [_fspath(m) for m in models]


def check_repo_id(value: Any, flag: str = "--push-to", name: str = "push_to") -> str:
    """A Hub repo ID to push to: `ORG/NAME`, or `NAME` for the token's own namespace (checked without
    a network: huggingface_hub's own rules), else a RecipeError naming the flag and the form."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hint = (f"Use ORG/NAME, or NAME for your own namespace: letters, digits, '-', '_' and '.', "
            f"e.g. {flag} me/my-merge ({name}=... in Python).")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"Invalid {flag} {value!r}: not a repo ID.", hint=hint)
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        if value.count("/") > 1:
            reason = "a repo ID has at most one '/'"
        elif value.startswith("/") or value.endswith("/"):
            reason = "the organization or the name is empty"
        elif any(c.isspace() for c in value):
            reason = "a repo ID has no spaces"
        else:
            reason = (f"{str(exc).split(':')[0].rstrip('.')} (huggingface_hub's rule: no '-' or '.' at either "
                      "end of the name, 96 characters at most)")
        raise RecipeError(f"Invalid {flag} {value!r}: {reason}.", hint=hint) from None
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _gb(value: float) -> str:
    return f"{value:g}"


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
    if unit == "B" and math.isfinite(value) and 0 < value < 10**6:
        # mergekit's `--out-shard-size 5B` means 5 billion parameters; here '5B' would be 5 bytes (a
        # shard per tensor): refused rather than guessed.
        raise RecipeError(f"Invalid size {size!r}: sizes here are bytes, and in mergekit {num}B means "
                          f"{num} billion parameters.",
                          hint=f"Use 5GB (the default), or {_gb(value * 2)}GB for {num} billion bfloat16 "
                               f"parameters per shard.")
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


RECIPE_FORMATS = ("auto", "hf-metagpt", "mergekit")


#: The largest recipe file read (bytes): a recipe of thousands of models fits many times over.
MAX_RECIPE_BYTES = 1 << 20
#: The most values a recipe may hold once its YAML aliases are expanded (each `*alias` counts again).
MAX_RECIPE_VALUES = 100_000


def load_recipe(path: str | Path, fmt: str = "auto") -> dict[str, Any]:
    """Read a recipe file into checked option values (unknown keys and wrong types name their line).

    `fmt` "auto" reads a recipe with a `merge_method` key as mergekit's (`mergekit_recipe.py`).
    Only a regular file of at most `MAX_RECIPE_BYTES` is read (never a device, a pipe or a folder).
    """
    path = Path(path)
    hint = "Point --recipe at a YAML file."
    not_regular = RecipeError(f"Recipe {path} is not a regular file (a device, a pipe or a folder).", hint=hint)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a pipe would wait for a writer
            raise not_regular
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise not_regular
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"Cannot read recipe {path}: {exc.strerror or exc}.") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"Recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB: too large to be a recipe.",
                          hint=hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"Recipe {path} is not UTF-8 text (byte {exc.start}).", hint=hint) from None
    return parse_recipe(text, str(path), fmt)


def check_expanded_size(node: yaml.Node | None, source: str, limit: int = MAX_RECIPE_VALUES) -> None:
    """Refuse YAML whose aliases expand past `limit` values (a "billion laughs" recipe: each level of
    aliases doubles what every reader of the recipe walks). Stops counting at the limit: bounded time."""
    count = 0
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        count += 1
        if count > limit:
            raise RecipeError(f"Recipe {source} expands to more than {limit} values (nested YAML aliases?).",
                              hint="Write the values out, or use fewer `&anchor`/`*alias` references.")
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers today: `1e-9` is a float (PyYAML's YAML 1.1 wants `1.0e-9`)."""


# Appended after the YAML 1.1 resolvers, so it only catches what they leave as strings.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with `1e-9` read as a number (recipes and `--param` values)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_recipe(text: str, source: str = "<recipe>", fmt: str = "auto") -> dict[str, Any]:
    """Parse recipe text; errors name the key and its line."""
    if fmt not in RECIPE_FORMATS:
        raise RecipeError(f"Invalid recipe format {fmt!r}.", hint=f"Use one of: {', '.join(RECIPE_FORMATS)}.")
    try:
        node = yaml.compose(text, Loader=_Loader)
        check_expanded_size(node, source)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"Recipe {source} is nested too deeply to be a recipe.") from None
    if fmt == "mergekit":
        from .mergekit_recipe import parse_mergekit

        return parse_mergekit(text, source)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"Recipe {source} is nested too deeply to be a recipe.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"Recipe {source} must be a mapping of option names to values.")
    if fmt == "auto" and "merge_method" in data:
        from .mergekit_recipe import parse_mergekit

        return parse_mergekit(text, source)
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
                              hint="Use HF_TOKEN, `hf auth login` or --token (token=... in Python) instead.")
        if name not in known:
            raise RecipeError(f"Unknown recipe key {key!r} ({where}).",
                              hint=f"Known keys: {', '.join(sorted(known - {'token'}))}.")
        if name == "max_shard_size" and isinstance(value, int):
            value = str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and hints[name] is str:
            value = str(value)
        if not _type_ok(value, hints[name]):
            got = type(value).__name__
            if isinstance(value, list):  # 'list' alone reads as if a list were wrong: say what is in it
                got += " of " + ", ".join(sorted({type(v).__name__ for v in value}))
            raise RecipeError(f"Recipe key {key!r} ({where}) has the wrong type: {got}.",
                              hint=f"Expected {_describe(hints[name])}.")
        out[name] = value
    return out


def _describe(annotation: Any) -> str:
    """What a recipe value should be ('int', 'a list of str', 'int or null'): never just 'list'."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list of {_describe(item)}"
    if origin is dict:
        return "a mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation)


def build_options(recipe: str | os.PathLike | None = None, recipe_format: str = "auto", *, for_merge: bool = True,
                  **overrides: Any) -> MergeOptions:
    """Options from a recipe file (if any) with explicit values on top (None means 'not given').

    Args:
        recipe: a YAML recipe file; its keys are `MergeOptions` field names (or a mergekit recipe).
        recipe_format: `auto` (a `merge_method` key means mergekit's format), `hf-metagpt` or `mergekit`.
        for_merge: require an output (see `MergeOptions.validate`); False for `plan()`.
        **overrides: `MergeOptions` fields; paths may be `str` or `os.PathLike`.

    Raises:
        RecipeError: an unknown key, a value of the wrong type, or a missing base/model/output.
    """
    values: dict[str, Any] = load_recipe(recipe, recipe_format) if recipe else {}
    for key, value in overrides.items():
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
            values[key] = value
    opts = MergeOptions(**values)
    opts.validate(for_merge=for_merge)
    return opts


#: options that say where and how this machine wrote or published the merge, not what was merged:
#: left out of the public recipe (a card on the Hub must not carry a local path or a push target)
LOCAL_KEYS = ("output", "overwrite", "token", "push_to", "private", "create_pr", "revision",
               "commit_message", "low_disk")


def public_name(ref: "ModelRef") -> str:
    """How an input is named in a published recipe: `org/name@sha` for the Hub, else the folder name."""
    if ref.repo_id:
        return ref.pinned
    name = local_name(ref.spec)
    if name in (".", "..") and ref.local_path is not None:  # `.` says nothing; the folder's name does
        name = ref.local_path.name
    return name


def local_name(path: str | os.PathLike) -> str:
    """A local path reduced to its last component ('/home/me/models/chat/' -> 'chat')."""
    text = os.fspath(path).rstrip("/\\")
    return re.split(r"[/\\]", text)[-1] or text or "."


def public_recipe(opts: MergeOptions, base: "ModelRef", models: Sequence["ModelRef"]) -> str:
    """The recipe that reproduces a merge, fit to publish: no local path, no output, no secret.

    Hub inputs are pinned to the commit that was merged (`org/name@sha`); local inputs appear by
    their folder name only; where the output went and how it was pushed are left out. The first
    line is a YAML comment with the hf-metagpt version that made the merge (a comment, so the
    file stays a valid `--recipe`).

    Args:
        opts: the options of the merge.
        base: the base's reference after resolution (its `sha` set for a Hub input).
        models: the fine-tunes' references, in the merge's order.

    Returns:
        YAML text for `hf_metagpt_recipe.yaml` and the card's "Reproduce it" section.
    """
    from ._version import __version__

    values = {k: _fspath(v) for k, v in opts.to_recipe().items() if k not in LOCAL_KEYS}
    values["base"] = public_name(base)
    values["models"] = [public_name(m) for m in models]
    source = opts.tokenizer_source
    if source and source != "base":
        if source == opts.base:
            values["tokenizer_source"] = "base"
        else:
            match = [m for m in models if source in (m.spec, m.display, m.repo_id, str(m.local_path))]
            values["tokenizer_source"] = public_name(match[0]) if match else local_name(source)
    ordered = {k: values[k] for k in ("base", "models") if k in values}
    ordered.update((k, v) for k, v in values.items() if k not in ordered)
    return f"# made with hf-metagpt {__version__}\n" + yaml.safe_dump(ordered, sort_keys=False)


def looks_local(value: str) -> bool:
    """A path of the merging machine rather than a Hub ID (`org/name[@rev]`)."""
    return (value.startswith((".", "/", "~", "\\")) or "\\" in value or bool(re.match(r"^[A-Za-z]:", value))
            or value.split("@", 1)[0].count("/") > 1)


def public_recipe_text(text: str) -> str:
    """A recipe made fit to publish, whoever wrote it: no output, token or push target, and local
    inputs by their folder name. Text that is not a recipe mapping is left out entirely."""
    if not text.strip():
        return ""
    try:
        data = load_yaml(text)
    except (yaml.YAMLError, RecursionError):
        return ""
    if not isinstance(data, dict):
        return ""
    comments = [line for line in text.splitlines() if line.startswith("# made with hf-metagpt")]
    data = {k: v for k, v in data.items() if k not in LOCAL_KEYS}
    for key in ("base", "tokenizer_source"):
        if isinstance(data.get(key), str) and looks_local(data[key]):
            data[key] = local_name(data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [local_name(m) if isinstance(m, str) and looks_local(m) else m for m in data["models"]]
    from ._version import __version__

    head = comments[0] if comments else f"# made with hf-metagpt {__version__}"
    return head + "\n" + yaml.safe_dump(data, sort_keys=False)
