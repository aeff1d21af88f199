"""Cut stream groups into pieces of bounded size, so memory does not grow with the model.

A stream group is one transformer block (or one tensor outside the blocks). Reading a whole
block of every input at once makes memory grow with the model: a 3B block is 2.8x a 1.1B block
and a 70B block is 25x. So the engine reads *pieces*: a whole group when it fits the unit budget
(bytes of all inputs together), else runs of its tensors, and a tensor too large on its own (the
embedding matrix, `lm_head`) in row slabs. A row slab of a row-major tensor is one contiguous
byte range of its file, so it is still one large read.

Pure functions of the plan: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..constants import UNIT_ENV, env
from ..safetensors_io import TensorMeta
from ..sources.model import ModelInfo
from .plan import StreamGroup, TensorPlan

#: 384 MiB holds a whole TinyLlama-1.1B block of four inputs (352 MB): the one-pass layer
#: granularity then reads each block once. Larger blocks are cut (their norms are reduced first,
#: then the pieces are read again, from the page cache, to merge). The engine holds two pieces
#: (one merging, one being read), so the read buffers take about twice this.
DEFAULT_UNIT_BYTES = 384 << 20


def unit_bytes() -> int:
    """The unit budget from `HF_METAGPT_UNIT_MB`, or the default."""
    raw = env(UNIT_ENV)
    if not raw:
        return DEFAULT_UNIT_BYTES
    try:
        mb = float(raw)
    except ValueError:
        mb = 0.0
    if not mb > 0:
        from ..errors import InputError

        raise InputError(f"{UNIT_ENV}={raw!r} is not a positive number of MiB.", hint=f"Unset it or set e.g. {UNIT_ENV}=256.")
    return max(1, int(mb * (1 << 20)))


@dataclass(frozen=True)
class Piece:
    """What the engine reads and merges at once.

    `rows` set: a row slab [lo, hi) of the output rows of the one tensor in `tensors`.
    """

    group: StreamGroup
    tensors: tuple[TensorPlan, ...]
    rows: tuple[int, int] | None = None

    @classmethod
    def whole(cls, group: StreamGroup) -> "Piece":
        return cls(group, tuple(group.tensors))

    @property
    def extra_rows(self) -> bool:
        """A slab of rows that only the tokenizer's model has (copied, not merged)."""
        tp = self.tensors[0]
        return self.rows is not None and tp.shared_rows is not None and self.rows[0] >= tp.shared_rows


def reads(tp: TensorPlan, index: int, rows: tuple[int, int] | None = None) -> bool:
    """Whether input `index` (0 = base) reads its copy of `tp` (or of these rows of it).

    Integer buffers come from the base alone, extra vocabulary rows from their one source.
    """
    if not tp.floating:
        return index == 0
    if rows is not None and tp.shared_rows is not None and rows[0] >= tp.shared_rows:
        return index == (tp.extra_source or 0)
    return True


def slab_meta(meta: TensorMeta, lo: int, hi: int) -> TensorMeta | None:
    """The stored rows [lo, hi) of a tensor (clipped to the rows it has) as their own TensorMeta."""
    rows = meta.shape[0] if meta.shape else 0
    hi = min(hi, rows)
    if hi <= lo:
        return None
    row = meta.nbytes // rows
    start = meta.data_offsets[0]
    return replace(meta, shape=(hi - lo, *meta.shape[1:]), data_offsets=(start + lo * row, start + hi * row))


def piece_metas(piece: Piece, info: ModelInfo, index: int) -> list[TensorMeta]:
    """What input `index` reads for a piece (an empty list: nothing)."""
    out = []
    for tp in piece.tensors:
        if not reads(tp, index, piece.rows) or tp.name not in info.tensors:
            continue
        meta: TensorMeta | None = info.tensors[tp.name]
        if piece.rows is not None:
            meta = slab_meta(meta, *piece.rows)  # type: ignore[arg-type]
        if meta is not None:
            out.append(meta)
    return out


def piece_bytes(piece: Piece, infos: Sequence[ModelInfo | None]) -> int:
    """Stored bytes a piece reads; `infos[i]` None: input i is not read through the pool (an adapter)."""
    return sum(m.nbytes for i, info in enumerate(infos) if info is not None
               for m in piece_metas(piece, info, i))


def split_group(group: StreamGroup, infos: Sequence[ModelInfo | None], budget: int, *, slabs: bool) -> list[Piece]:
    """The pieces of one group, in plan order, each reading at most `budget` bytes when it can.

    Consecutive tensors are packed while they fit; with `slabs`, a tensor larger than the budget on
    its own is cut into row slabs (merged rows and copied extra vocabulary rows never share a slab).
    Without `slabs` (methods that need a whole tensor: TIES, DARE, adapters) such a tensor is a
    piece of its own. A group that fits is one piece, exactly as before.
    """
    whole = Piece.whole(group)
    if piece_bytes(whole, infos) <= budget:
        return [whole]
    pieces: list[Piece] = []
    run: list[TensorPlan] = []
    run_bytes = 0
    for tp in group.tensors:
        n = piece_bytes(Piece(group, (tp,)), infos)
        if slabs and tp.floating and n > budget and len(tp.out_shape) >= 1 and tp.out_shape[0] > 1:
            if run:
                pieces.append(Piece(group, tuple(run)))
                run, run_bytes = [], 0
            pieces += _slabs(group, tp, infos, budget)
            continue
        if run and run_bytes + n > budget:
            pieces.append(Piece(group, tuple(run)))
            run, run_bytes = [], 0
        run.append(tp)
        run_bytes += n
    if run:
        pieces.append(Piece(group, tuple(run)))
    return pieces


def _slabs(group: StreamGroup, tp: TensorPlan, infos: Sequence[ModelInfo | None], budget: int) -> list[Piece]:
    out_rows = tp.out_shape[0]
    spans = [(0, out_rows)]
    if tp.shared_rows is not None and tp.shared_rows < out_rows:
        spans = [(0, tp.shared_rows), (tp.shared_rows, out_rows)]
    pieces = []
    for lo, hi in spans:
        row_bytes = max(1, piece_bytes(Piece(group, (tp,), rows=(lo, lo + 1)), infos))
        step = max(1, budget // row_bytes)
        pieces += [Piece(group, (tp,), rows=(r, min(r + step, hi))) for r in range(lo, hi, step)]
    return pieces
