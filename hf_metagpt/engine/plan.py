"""Plan a merge before reading any weight: which tensors exist, how they group, what is written.

Everything here works from configs and safetensors headers only (local files, or remote headers
fetched by `hub`), so a merge that cannot work stops before a single shard is read or downloaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleModelsError, InputError, MergeError
from ..options import MergeOptions, parse_size
from ..safetensors_io import dtype_itemsize
from ..sources.model import ModelInfo

log = logging.getLogger(__name__)

# Config fields that must agree for task vectors to make sense (vocab_size is handled by the
# vocabulary policy of shared/METHOD.md instead).
CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "tie_word_embeddings",
)
# A transformer block: `layers.N.` (LLaMA, Mistral, Qwen, Gemma, GPT-NeoX, OPT's decoder, towers of
# multimodal models) or `h.N.` (GPT-2, Falcon, BLOOM). The leftmost match names the block.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_ST_NAMES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class TensorPlan:
    """One output tensor: where its norm goes, which rows are merged, where it is written."""

    name: str
    out_shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    floating: bool
    norm_group: str
    stream_group: str
    shared_rows: int | None = None  # vocab tensors: rows [0, shared_rows) are merged
    extra_source: int | None = None  # 0 = base, t = fine-tune t: supplies rows [shared_rows, out rows)
    shard: int = 0

    @property
    def nbytes(self) -> int:
        n = dtype_itemsize(self.out_dtype)
        for s in self.out_shape:
            n *= s
        return n


@dataclass
class StreamGroup:
    """Tensors read and merged together: one transformer block, or one tensor outside the blocks."""

    name: str
    tensors: list[TensorPlan]


@dataclass
class ShardPlan:
    file: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    """The checked plan of a merge: the input to `stream.run`."""

    options: MergeOptions
    base: ModelInfo
    models: list[ModelInfo]
    tokenizer_source: int  # 0 = base, t = fine-tune t (1-based)
    out_dtype: str
    groups: list[StreamGroup]
    shards: list[ShardPlan]
    norm_groups: list[str]
    two_pass: bool
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[ModelInfo]:
        return [self.base, *self.models]

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for g in self.groups for t in g.tensors]

    @property
    def bytes_to_read(self) -> int:
        """Bytes read per pass (every stored tensor of every input that is merged or copied)."""
        names = {t.name for t in self.tensors}
        return sum(m.nbytes for info in self.inputs for n, m in info.tensors.items()
                   if n in names or info.ref.is_adapter)

    @property
    def bytes_to_write(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def describe(self) -> str:
        """Human-readable plan (what `hf-metagpt plan` prints)."""
        o = self.options
        lines = [f"Merge plan: method={o.method} granularity={o.granularity} output dtype={_ST_NAMES.get(self.out_dtype, self.out_dtype)}"]
        lines.append(f"  base:       {self.base.ref.pinned}")
        for i, m in enumerate(self.models, 1):
            lines.append(f"  model {i}:    {m.ref.pinned}" + ("  (LoRA adapter)" if m.ref.is_adapter else ""))
        tok = "base" if self.tokenizer_source == 0 else self.models[self.tokenizer_source - 1].name
        lines.append(f"  tokenizer:  {tok}")
        lines.append(f"  tensors:    {len(self.tensors)} in {len(self.groups)} stream groups, "
                     f"{len(self.norm_groups)} norm group(s)")
        passes = 2 if self.two_pass else 1
        lines.append(f"  read:       {_fmt_bytes(self.bytes_to_read)} per pass x {passes} pass(es)")
        lines.append(f"  write:      {_fmt_bytes(self.bytes_to_write)} in {len(self.shards)} shard(s)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n}"


# ---------------------------------------------------------------- reading one local model's headers


# ---------------------------------------------------------------- checks across models

def check_configs(base: ModelInfo, models: list[ModelInfo]) -> None:
    for m in models:
        b_arch = base.config.get("architectures")
        m_arch = m.config.get("architectures")
        if b_arch and m_arch and b_arch != m_arch:
            raise IncompatibleModelsError(
                f"{m.name} is a {m_arch[0]} but the base {base.name} is a {b_arch[0]}.",
                hint="All fine-tunes must share the base's architecture.")
        for key in CONFIG_KEYS:
            bv, mv = base.config.get(key), m.config.get(key)
            if key == "tie_word_embeddings":
                bv, mv = bool(bv), bool(mv)
            elif bv is None or mv is None:
                continue
            if bv != mv:
                raise IncompatibleModelsError(
                    f"{m.name} has {key}={mv} but the base {base.name} has {key}={bv}.",
                    hint="Task vectors only exist between fine-tunes of the same base model; check the model IDs.")


def skeleton_names(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes the base config implies, from an empty-weight (meta) model."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg_dict = dict(config)
        model_type = cfg_dict.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        state = model.state_dict()
        try:  # transformers 5 renames some weights in memory (GPT-NeoX embed_out -> lm_head): use the stored names
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(model, state)
        except Exception as exc:  # older transformers, or a conversion that needs real tensors
            log.debug("stored names of %s not derived (%s); using the module names", model_type, exc)
        return {k: tuple(v.shape) for k, v in state.items()}
    except Exception as exc:  # custom architectures: the check is skipped, not the merge
        log.warning("Could not build a %s skeleton to check parameter names (%s); skipping that check.",
                    config.get("model_type"), exc)
        return None


def check_against_skeleton(base: ModelInfo, warnings: list[str]) -> None:
    expected = skeleton_names(base.config)
    if expected is None:
        return
    stored = base.tensors
    tied = bool(base.config.get("tie_word_embeddings"))
    missing = [n for n in expected if n not in stored and not (tied and n.endswith("lm_head.weight"))]
    if missing:
        raise IncompatibleModelsError(
            f"The base {base.name} lacks {len(missing)} parameter(s) its config implies, e.g. {missing[0]!r}.",
            hint="The checkpoint is incomplete or its config does not match its weights.")
    unexpected = [n for n in stored if n not in expected]
    if unexpected:
        warnings.append(f"the base stores {len(unexpected)} tensor(s) its architecture does not use "
                        f"(e.g. {unexpected[0]!r}); they are merged and written as they are")
    for n, shape in expected.items():
        if n in stored and stored[n].shape != shape:
            raise IncompatibleModelsError(
                f"The base {base.name} stores {n!r} with shape {list(stored[n].shape)} but its config implies {list(shape)}.",
                hint="The config does not match the weights; fix config.json.")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(_VOCAB_SUFFIXES)


def check_tensors(base: ModelInfo, models: list[ModelInfo]) -> None:
    for m in models:
        missing = [n for n in base.tensors if n not in m.tensors]
        if missing:
            raise IncompatibleModelsError(
                f"{m.name} lacks tensor {missing[0]!r} that the base has"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ".",
                hint="Is it a fine-tune of this base? Adapters and partial checkpoints need their own support.")
        extra = [n for n in m.tensors if n not in base.tensors]
        if extra:
            raise IncompatibleModelsError(
                f"{m.name} has tensor {extra[0]!r} that the base lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + ".",
                hint="The fine-tune adds parameters the base does not have; MetaGPT needs the same parameter set.")
        if m.provisional or base.provisional:
            continue  # shapes and dtypes of pickle inputs are checked once converted (before any write)
        for n, bm in base.tensors.items():
            mm = m.tensors[n]
            if mm.shape == bm.shape:
                continue
            if is_vocab_tensor(n) and mm.shape[1:] == bm.shape[1:]:
                continue
            raise IncompatibleModelsError(
                f"Shape mismatch for {n!r}: {m.name} has {list(mm.shape)}, the base has {list(bm.shape)}.",
                hint="The models are not fine-tunes of the same base architecture.")
        if bm_float_mismatch := [n for n, bm in base.tensors.items() if bm.is_floating != m.tensors[n].is_floating]:
            raise IncompatibleModelsError(
                f"{m.name} stores {bm_float_mismatch[0]!r} as {m.tensors[bm_float_mismatch[0]].dtype}, "
                f"the base as {base.tensors[bm_float_mismatch[0]].dtype}.",
                hint="Floating and integer tensors cannot be merged with each other.")


# ---------------------------------------------------------------- grouping

def block_of(name: str) -> str | None:
    """The block a tensor belongs to: `layers.N` for `model.layers.N.*`, else its path up to N.

    The path keeps blocks of different towers apart (`vision_tower.encoder.layers.3` and
    `language_model.layers.3` are two groups) and names other families' blocks as they are
    (`transformer.h.3`, `gpt_neox.layers.3`, `decoder.layers.3`); the leading `model.` is dropped,
    so LLaMA-style names keep the group names of METHOD.md.
    """
    m = _BLOCK.search(name)
    if not m:
        return None
    path = name[: m.end() - 1]
    return path[len("model."):] if path.startswith("model.") else path


def _order_key(name: str) -> tuple[int, str, int, str]:
    block = _BLOCK.search(name)
    if block:
        return (1, name[: block.start()], int(block.group(1)), name)
    return (0 if "embed" in name else 2, "", 0, name)


def norm_group_of(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        return block_of(name) or name
    return name


def resolve_tokenizer_source(opts: MergeOptions, models: list[ModelInfo]) -> int:
    src = opts.tokenizer_source
    if not src or src == "base" or src == opts.base:
        return 0
    for i, m in enumerate(models, 1):
        if src in (m.ref.spec, m.ref.display, m.ref.repo_id, str(m.ref.local_path)):
            return i
    raise MergeError(f"--tokenizer-source {src!r} is neither 'base' nor one of the fine-tunes.",
                     hint="Use 'base' or repeat one of the fine-tune references exactly as given.")


def out_dtype_of(opts: MergeOptions, base: ModelInfo) -> str:
    if opts.dtype != "auto":
        return _DTYPE_NAMES[opts.dtype]
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(name, str) and name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    for meta in base.tensors.values():
        if meta.is_floating and meta.dtype in _ST_NAMES:
            return meta.dtype
    return "F32"


def build_plan(opts: MergeOptions, base: ModelInfo, models: list[ModelInfo], method_uses_norms: bool = True,
               check_skeleton: bool = True) -> MergePlan:
    """Check every input against the base and lay out groups and shards.

    `check_skeleton=False` leaves the meta-model check to the caller (`api.merge` runs it beside
    the merge for local inputs: building the skeleton imports transformers' modeling code, seconds).
    """
    warnings: list[str] = []
    notes: list[str] = []
    if base.ref.is_adapter:
        raise InputError(f"The base {base.name} is a PEFT adapter; the base must be a full model.",
                         hint="Pass the model the adapter was trained on as --base, and the adapter as a fine-tune.")
    full = [m for m in models if not m.ref.is_adapter]
    check_configs(base, full)
    check_tensors(base, full)
    for m in models:
        if m.ref.is_adapter:  # lora.AdapterInfo: its own names, checked against the base's
            m.check_against_base(base, opts.strict, warnings)  # type: ignore[attr-defined]
    if check_skeleton:
        check_against_skeleton(base, warnings)
    tok = resolve_tokenizer_source(opts, models)
    out_dtype = out_dtype_of(opts, base)
    granularity = opts.granularity
    if granularity == "layer" and not any(block_of(n) for n in base.tensors):
        warnings.append("no tensor names match '*.layers.N.*' or '*.h.N.*': --granularity layer falls back to tensor")
        granularity = "tensor"

    inputs = [base, *models]
    plans: list[TensorPlan] = []
    for name in sorted(base.tensors, key=_order_key):
        bm = base.tensors[name]
        floating = bm.is_floating
        shape = bm.shape
        shared = extra = None
        if is_vocab_tensor(name) and len({i.shape_of(name)[0] for i in inputs}) > 1:
            rows = [i.shape_of(name)[0] for i in inputs]
            shared = min(rows)
            out_rows = rows[tok]
            shape = (out_rows, *bm.shape[1:])
            if out_rows > shared:
                extra = tok
                notes.append(f"{name}: rows {shared}..{out_rows - 1} copied from {inputs[tok].name} (tokenizer source)")
            for i, r in enumerate(rows):
                if i != tok and r > shared:
                    notes.append(f"{name}: rows {shared}..{r - 1} of {inputs[i].name} dropped "
                                 f"(not in every model; the output vocabulary is {inputs[tok].name}'s, {out_rows} rows)")
        plans.append(TensorPlan(
            name=name, out_shape=shape, out_dtype=out_dtype if floating else bm.dtype, floating=floating,
            norm_group=norm_group_of(name, granularity), stream_group=block_of(name) or name,
            shared_rows=shared, extra_source=extra,
        ))

    groups: list[StreamGroup] = []
    for tp in plans:
        if not groups or groups[-1].name != tp.stream_group:
            groups.append(StreamGroup(tp.stream_group, []))
        groups[-1].tensors.append(tp)

    limit = parse_size(opts.max_shard_size)
    shard_lists: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in plans:
        if shard_lists[-1] and size + tp.nbytes > limit:
            shard_lists.append([])
            size = 0
        shard_lists[-1].append(tp)
        size += tp.nbytes
    n = len(shard_lists)
    shards = []
    for k, lst in enumerate(shard_lists):
        for tp in lst:
            tp.shard = k
        shards.append(ShardPlan(f"model-{k + 1:05d}-of-{n:05d}.safetensors", lst))

    norm_groups = list(dict.fromkeys(tp.norm_group for tp in plans if tp.floating))
    # Two passes exactly when some norm group spans more than one stream group (the paper's
    # whole-model λ): every norm of the group must be known before its first tensor is written.
    spans: dict[str, set[str]] = {}
    for tp in plans:
        if tp.floating:
            spans.setdefault(tp.norm_group, set()).add(tp.stream_group)
    two_pass = method_uses_norms and any(len(s) > 1 for s in spans.values())
    if len(models) == 1:
        warnings.append(f"only one fine-tune: every λ is 1 and the result equals {models[0].name}")
    warnings.extend(_repeated_models(models))
    return MergePlan(options=opts, base=base, models=models, tokenizer_source=tok, out_dtype=out_dtype,
                     groups=groups, shards=shards, norm_groups=norm_groups, two_pass=two_pass,
                     warnings=warnings, notes=notes)


def _repeated_models(models: list[ModelInfo]) -> list[str]:
    """The same fine-tune listed twice is allowed (the formula is well defined) but said: mostly a typo."""
    seen: dict[object, str] = {}
    out = []
    for m in models:
        key = (m.ref.repo_id, m.ref.sha or m.ref.revision) if m.ref.is_hub else m.ref.local_path
        if key in seen:
            out.append(f"{m.name} is listed more than once (as {seen[key]}): it is merged once per listing, "
                       "so its share of the merge grows; remove the repeat unless that is intended")
        else:
            seen[key] = m.name
    return out
