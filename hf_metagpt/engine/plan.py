"""Plan a merge before reading any weight: which tensors exist, how they group, what is written.

Everything here works from configs and safetensors headers only (local files, or remote headers
fetched by `hub`), so a merge that cannot work stops before a single shard is read or downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

from ..errors import IncompatibleModelsError, InputError, MergeError
from ..options import MergeOptions, parse_size
from ..dtype_names import CONFIG_TO_ST, ST_TO_CONFIG
from ..safetensors_io import dtype_itemsize
from ..sources.model import ModelInfo
from ..sources.architecture import (CONFIG_KEYS, block_of, config_facts, config_value,
                                     skeleton_mismatches, skeleton_names, stream_order,
                                     tied_embeddings)

log = logging.getLogger(__name__)

_VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class StreamGroup:
    """Tensors read and merged together: one transformer block, or one tensor outside the blocks."""

    name: str
    tensors: tuple[TensorPlan, ...]


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    """The checked plan of a merge (a value): inputs pinned, groups, shards; the input to `schedule`.

    `granularity` is the one the merge uses (`layer` falls back to `tensor` without blocks).
    Nothing changes a plan after it is made: `with_notes` and `with_inputs` make new ones.
    """

    options: MergeOptions
    base: ModelInfo
    models: tuple[ModelInfo, ...]
    tokenizer_source: int  # 0 = base, t = fine-tune t (1-based)
    out_dtype: str
    groups: tuple[StreamGroup, ...]
    shards: tuple[ShardPlan, ...]
    norm_groups: tuple[str, ...]
    two_pass: bool
    granularity: str = "model"
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: the output tokenizer's chat template when it is not the tokenizer source's own (None: its own)
    chat_template: str | None = None

    def with_notes(self, notes: Sequence[str] = (), warnings: Sequence[str] = ()) -> "MergePlan":
        return replace(self, notes=self.notes + tuple(notes), warnings=self.warnings + tuple(warnings))

    def with_inputs(self, inputs: Sequence[ModelInfo]) -> "MergePlan":
        """The same plan reading these inputs (e.g. Hub inputs now in local snapshot folders)."""
        assert len(inputs) == len(self.inputs)
        return replace(self, base=inputs[0], models=tuple(inputs[1:]))

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
        lines = [f"Merge plan: method={o.method} granularity={self.granularity} output dtype={ST_TO_CONFIG.get(self.out_dtype, self.out_dtype)}"]
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

def check_configs(base: ModelInfo, models: Sequence[ModelInfo]) -> None:
    b_facts = config_facts(base.config) if models else None
    for m in models:
        b_arch = base.config.get("architectures")
        m_arch = m.config.get("architectures")
        if b_arch and m_arch and b_arch != m_arch:
            raise IncompatibleModelsError(
                f"{m.name} is a {m_arch[0]} but the base {base.name} is a {b_arch[0]}.",
                hint="All fine-tunes must share the base's architecture.")
        m_facts = config_facts(m.config)
        for key in CONFIG_KEYS:
            bv, mv = config_value(base.config, b_facts, key), config_value(m.config, m_facts, key)
            if key == "tie_word_embeddings":
                bv, mv = bool(bv), bool(mv)
            elif bv is None or mv is None:
                continue
            if bv != mv:
                raise IncompatibleModelsError(
                    f"{m.name} has {key}={mv} but the base {base.name} has {key}={bv}.",
                    hint="Task vectors only exist between fine-tunes of the same base model; check the model IDs.")


def check_against_skeleton(base: ModelInfo, warnings: list[str]) -> None:
    expected = skeleton_names(base.config)
    if expected is None:
        return
    missing, unexpected, shapes = skeleton_mismatches(expected, base.tensors, tied_embeddings(base.config))
    if missing:
        raise IncompatibleModelsError(
            f"The base {base.name} lacks {len(missing)} parameter(s) its config implies, e.g. {missing[0]!r}.",
            hint="The checkpoint is incomplete or its config does not match its weights.")
    if unexpected:
        warnings.append(f"the base stores {len(unexpected)} tensor(s) its architecture does not use "
                        f"(e.g. {unexpected[0]!r}); they are merged and written as they are")
    for n, stored, implied in shapes[:1]:
        raise IncompatibleModelsError(
            f"The base {base.name} stores {n!r} with shape {list(stored)} but its config implies {list(implied)}.",
            hint="The config does not match the weights; fix config.json.")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(_VOCAB_SUFFIXES)


def check_tensors(base: ModelInfo, models: Sequence[ModelInfo]) -> None:
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

def norm_group_of(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        return block_of(name) or name
    return name


def resolve_tokenizer_source(opts: MergeOptions, models: Sequence[ModelInfo]) -> int:
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
        return CONFIG_TO_ST[opts.dtype]
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(name, str) and name in CONFIG_TO_ST:
        return CONFIG_TO_ST[name]
    for meta in base.tensors.values():
        if meta.is_floating and meta.dtype in ST_TO_CONFIG:
            return meta.dtype
    return "F32"


#: past this many fine-tunes a MetaGPT merge warns (its geometry and side files grow with T²)
MANY_MODELS = 32


def build_plan(opts: MergeOptions, base: ModelInfo, models: Sequence[ModelInfo], method_uses_norms: bool = True,
               check_skeleton: bool = True) -> MergePlan:
    """Check every input against the base and lay out groups and shards (a value; nothing is read).

    `check_skeleton`: also check the base's tensors against the empty-weight model its config
    implies (transformers' modeling code; seconds). `hf-metagpt plan` and `merge` always do.
    """
    warnings: list[str] = []
    notes: list[str] = []
    if opts.layers is not None:
        from .layers import apply_layers

        base, models, layer_notes = apply_layers(opts.layers, base, models)
        notes.extend(layer_notes)
    if base.ref.is_adapter:
        raise InputError(f"The base {base.name} is a PEFT adapter; the base must be a full model.",
                         hint="Pass the model the adapter was trained on as --base, and the adapter as a fine-tune.")
    check_configs(base, [m for m in models if not m.ref.is_adapter])
    check_tensors(base, [m for m in models if not m.ref.is_adapter])
    # Adapters (sources.lora.AdapterInfo) map their own names onto the base's.
    models = tuple(m.checked_against(base, opts.strict, warnings) if m.ref.is_adapter else m  # type: ignore[attr-defined]
                   for m in models)
    if check_skeleton:
        check_against_skeleton(base, warnings)
    tok = resolve_tokenizer_source(opts, models)
    vocab = None
    if opts.vocabulary is not None:  # mergekit's tokenizer sources (`sources/vocab.py`)
        from ..sources.vocab import vocab_rows

        tok, out_rows, shared, vocab_warnings = vocab_rows(opts.vocabulary, tok, [base, *models], opts.token)
        warnings.extend(vocab_warnings)
        vocab = (out_rows, shared)
        source = "base" if tok == 0 else models[tok - 1].name
        notes.append(f"vocabulary: {out_rows} rows, the tokens of {source}'s tokenizer"
                     + (" (the union of the models')" if opts.vocabulary == "union" else "")
                     + (f"; rows {shared}..{out_rows - 1} are {source}'s own" if out_rows > shared else ""))
    out_dtype = out_dtype_of(opts, base)
    granularity = opts.granularity
    if granularity == "layer" and not any(block_of(n) for n in base.tensors):
        warnings.append("no tensor names match a transformer block ('*.layers.N.*', '*.h.N.*'): --granularity "
                        "layer falls back to tensor (recorded as tensor)")
        granularity = "tensor"
    specs = _tensor_specs(base, models, tok, out_dtype, granularity, notes, vocab)
    shard_of = _shard_layout([nbytes for *_, nbytes in specs], parse_size(opts.max_shard_size))
    plans = [TensorPlan(*spec[:-1], shard=shard_of[k]) for k, spec in enumerate(specs)]
    groups = tuple(StreamGroup(name, tuple(tps)) for name, tps in _runs(plans, lambda t: t.stream_group))
    n = max(shard_of, default=0) + 1
    shards = tuple(ShardPlan(f"model-{k + 1:05d}-of-{n:05d}.safetensors", tuple(t for t in plans if t.shard == k))
                   for k in range(n))
    norm_groups = tuple(dict.fromkeys(tp.norm_group for tp in plans if tp.floating))
    # Two passes exactly when some norm group spans more than one stream group (the paper's
    # whole-model λ): every norm of the group must be known before its first tensor is written.
    spans: dict[str, set[str]] = {}
    for tp in plans:
        if tp.floating:
            spans.setdefault(tp.norm_group, set()).add(tp.stream_group)
    two_pass = method_uses_norms and any(len(s) > 1 for s in spans.values())
    if len(models) > MANY_MODELS and method_uses_norms:
        warnings.append(f"{len(models)} fine-tunes: MetaGPT's λ shrink like 1/{len(models)}, and the task-vector "
                        f"geometry grows with their square ({len(models) ** 2} dot products per tensor). The card "
                        "and its plots show the most similar pairs only; every Gram matrix is in "
                        "metagpt_gram.npy.")
    if len(models) == 1 and method_uses_norms:  # MetaGPT's λ; slerp and the others take one model their way
        warnings.append(f"only one fine-tune: every λ is 1 and the result equals {models[0].name}")
    warnings.extend(_repeated_models(models))
    return MergePlan(options=opts, base=base, models=models, tokenizer_source=tok, out_dtype=out_dtype,
                     groups=groups, shards=shards, norm_groups=norm_groups, two_pass=two_pass,
                     granularity=granularity, warnings=tuple(warnings), notes=tuple(notes))


def _tensor_specs(base: ModelInfo, models: Sequence[ModelInfo], tok: int, out_dtype: str, granularity: str,
                  notes: list[str], vocab: tuple[int, int] | None = None) -> list[tuple]:
    """(TensorPlan fields but the shard, then its output bytes) for every base tensor, in stream order;
    applies the vocabulary policy of docs/method.md (and says what it drops or copies)."""
    inputs = [base, *models]
    specs = []
    for name in sorted(base.tensors, key=stream_order):
        bm = base.tensors[name]
        shape, shared, extra = bm.shape, None, None
        if is_vocab_tensor(name) and vocab is not None:
            out_rows, n_shared = vocab
            rows = [i.shape_of(name)[0] for i in inputs]
            if rows[tok] < out_rows:
                raise IncompatibleModelsError(
                    f"{name}: {inputs[tok].name} has {rows[tok]} rows but its tokenizer {out_rows} tokens.",
                    hint="The tokenizer does not match the embeddings; use another tokenizer source.")
            shape = (out_rows, *bm.shape[1:])
            if not (n_shared == out_rows and all(r == out_rows for r in rows)):
                shared, extra = n_shared, (tok if out_rows > n_shared else None)
        elif is_vocab_tensor(name) and len({i.shape_of(name)[0] for i in inputs}) > 1:
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
        dtype = out_dtype if bm.is_floating else bm.dtype
        nbytes = dtype_itemsize(dtype)
        for d in shape:
            nbytes *= d
        specs.append((name, tuple(shape), dtype, bm.is_floating, norm_group_of(name, granularity),
                      block_of(name) or name, shared, extra, nbytes))
    return specs


def _shard_layout(sizes: Sequence[int], limit: int) -> list[int]:
    """The shard of each tensor: consecutive tensors while a shard stays within `limit` bytes."""
    out, k, size = [], 0, 0
    for n in sizes:
        if size and size + n > limit:
            k, size = k + 1, 0
        out.append(k)
        size += n
    return out


def _runs(items: Sequence[TensorPlan], key) -> list[tuple[str, list[TensorPlan]]]:
    """Consecutive items with the same key, in order."""
    runs: list[tuple[str, list[TensorPlan]]] = []
    for it in items:
        if not runs or runs[-1][0] != key(it):
            runs.append((key(it), []))
        runs[-1][1].append(it)
    return runs


def _repeated_models(models: Sequence[ModelInfo]) -> list[str]:
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
