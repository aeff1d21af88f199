"""One fine-tune as the engine sees it: what it reads for a piece and its task vector per tensor
(`TaskSource` for full fine-tunes, `AdapterSource` for LoRA adapters, whose norms come from their factors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from safetensors import safe_open

from ..safetensors_io import TensorMeta
from ..sources.lora import ADAPTER_WEIGHTS, AdapterInfo, LoraModule
from ..sources.model import ModelInfo
from .fetch import FileProvider
from .pieces import Piece, piece_metas
from .plan import TensorPlan
from .reader import advise, read_tensors_into

if TYPE_CHECKING:
    from .gram import LowRank


def read_metas(info: ModelInfo, model_index: int, metas: list[TensorMeta], files: FileProvider,
               buffer: torch.Tensor | None = None, direct: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Read these tensors (or row slabs) of one model: one large read per contiguous run per shard.

    With a `buffer`, the bytes land there (a pooled buffer: no fresh pages to fault in) and the
    returned tensors are views of it, valid until the buffer's next turn. `direct`: runs not in the
    page cache are read with O_DIRECT (`reader.read_tensors`; the buffer then needs
    `reader.DIRECT_SLACK` more bytes per tensor). Returns the tensors and the bytes read.
    """
    nbytes = sum(m.nbytes for m in metas)
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for file, part in _by_file(metas).items():
        got, used = read_tensors_into(files.path(model_index, info, file), part,
                                      buffer=buffer[pos:] if buffer is not None else None, direct=direct)
        out.update(got)
        pos += used
    return out, nbytes


def advise_metas(info: ModelInfo, model_index: int, metas: list[TensorMeta], files: FileProvider) -> None:
    """Ask the kernel to read these tensors ahead (`reader.advise`, per shard), without waiting."""
    for file, part in _by_file(metas).items():
        advise(files.path(model_index, info, file), part)


def _by_file(metas: list[TensorMeta]) -> dict[str, list[TensorMeta]]:
    by_file: dict[str, list[TensorMeta]] = {}
    for meta in metas:
        by_file.setdefault(meta.file, []).append(meta)
    return by_file


def as_f32(t: torch.Tensor, rows: int | None, device: torch.device) -> torch.Tensor:
    """A float32 copy on `device`, cut to the shared vocabulary rows when the plan says so."""
    if rows is not None:
        t = t[:rows]
    return t.to(device, torch.float32, copy=True)


class TaskSource:
    """One fine-tune as the engine sees it: what to read per group, τ per tensor, maybe an exact ‖τ‖².

    This class is a full fine-tune (τ = θt − θ0, its norm summed from τ). `lora.AdapterSource`
    is a LoRA adapter (τ = s·B·A, its norm from r×r matrices). Both go through the same engine
    code; only this seam differs.
    """

    #: read into the engine's pooled buffer (large shards); adapters read their small files themselves
    pooled = True
    #: some tensors are saved whole (an adapter's modules_to_save): the method path merges them
    saves_whole_tensors = False

    def __init__(self, info: ModelInfo, index: int, files: FileProvider, device: torch.device,
                 check: Callable[[torch.Tensor, str, str], None]) -> None:
        self.info = info
        self.index = index
        self.files = files
        self.device = device
        self.check = check  # the engine's non-finite policy (raise, or zero with --allow-nonfinite)

    def files_of(self, tensors: list[TensorPlan]) -> set[str]:
        """Files read for these tensors (so a low-disk provider can release them after)."""
        return {self.info.tensors[t.name].file for t in tensors if t.floating}

    def metas(self, piece: Piece) -> list[TensorMeta]:
        """What this model reads for a piece into the engine's pooled buffer."""
        # Integer buffers come from the base only; the fine-tunes' copies are never read.
        return piece_metas(piece, self.info, self.index)

    def read(self, piece: Piece, buffer: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
        return read_metas(self.info, self.index, self.metas(piece), self.files, buffer)

    def task_vector(self, tp: TensorPlan, raw: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """τ of one tensor in float32 on the device (`base` is θ0 in float32, already cut to rows)."""
        return as_f32(raw[tp.name], tp.shared_rows, self.device).sub_(base)

    def exact_part(self, tp: TensorPlan, raw: dict[str, torch.Tensor]) -> "LowRank | float | None":
        """τ for the Gram matrices without forming it: LoRA factors, 0.0 when untouched, None to form τ."""
        return None


class AdapterSource(TaskSource):
    """τ of a LoRA adapter for one tensor at a time: s·B·A, a saved full tensor − base, or 0."""

    info: AdapterInfo

    pooled = False  # adapter files are small: read on their own, not into the engine's pooled buffer

    @property
    def saves_whole_tensors(self) -> bool:  # type: ignore[override]
        return bool(self.info.full)

    def files_of(self, tensors: list[TensorPlan]) -> set[str]:
        return {ADAPTER_WEIGHTS} if any(self._keys(tp) for tp in tensors) else set()

    def _keys(self, tp: TensorPlan) -> list[str]:
        keys = []
        if tp.name in self.info.lora:
            m = self.info.lora[tp.name]
            keys += [m.a_key, m.b_key]
        if tp.name in self.info.full:
            keys.append(self.info.full[tp.name])
        return keys

    def read(self, piece: Piece, buffer: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """The piece's factors and saved tensors, by stored key (untouched parameters: nothing).

        Adapter files are small, so they are read with safe_open; `buffer` is not used.
        """
        tensors = piece.tensors
        keys = [k for tp in tensors if tp.floating for k in self._keys(tp)]
        out: dict[str, torch.Tensor] = {}
        if not keys:
            return out, 0
        with safe_open(self.files.path(self.index, self.info, ADAPTER_WEIGHTS), framework="pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
        return out, sum(self.info.tensors[k].nbytes for k in keys)

    def factors(self, tp: TensorPlan, raw: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, LoraModule]:
        """(B, A) in `dtype`, sliced to the plan's shared vocabulary rows."""
        m = self.info.lora[tp.name]
        a = raw[m.a_key].to(device, dtype)
        b = raw[m.b_key].to(device, dtype)
        if tp.shared_rows is not None:
            # Rows of Δ are columns of A when Δ = (B·A)ᵀ, rows of B otherwise.
            a, b = (a[:, : tp.shared_rows], b) if m.transposed else (a, b[: tp.shared_rows])
        self.check(a, self.info.name, m.a_key)
        self.check(b, self.info.name, m.b_key)
        return b, a, m

    def task_vector(self, tp: TensorPlan, raw: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        tau = None
        if tp.name in self.info.full:
            tau = as_f32(raw[self.info.full[tp.name]], tp.shared_rows, self.device).sub_(base)
        if tp.name in self.info.lora:
            b, a, m = self.factors(tp, raw, torch.float32, self.device)
            # Same order as peft's get_delta_weight: (B·A), transposed, times the scaling.
            delta = b @ a
            delta = (delta.t() if m.transposed else delta).mul(m.scale)
            tau = delta if tau is None else tau.add_(delta)
        return torch.zeros_like(base) if tau is None else tau

    def exact_part(self, tp: TensorPlan, raw: dict[str, torch.Tensor]) -> "LowRank | float | None":
        from .gram import LowRank

        if tp.name in self.info.full:
            return None
        if tp.name not in self.info.lora:
            return 0.0
        b, a, m = self.factors(tp, raw, torch.float64, self.device)
        return LowRank(b, a, m.scale, m.transposed)

