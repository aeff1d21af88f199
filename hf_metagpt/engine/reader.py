"""Read a group of tensors from a safetensors file with a few large reads, into reusable buffers.

`safetensors.safe_open` maps the whole file and `get_tensor` copies out of the mapping, so every
4 KiB page costs a page fault and touched pages count as resident memory while the handle is
open — the naive engine spent about a third of its time in the kernel on those faults. The
library has no "read these tensors into my buffer" call, so this module does exactly that: the
header is parsed (`safetensors_io.read_header`), the byte ranges of the wanted tensors are
coalesced into runs, and each run is read with one `readinto` into a buffer that is reused from
group to group. The tensors returned are views of that buffer, valid until the buffer is reused.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..safetensors_io import ST_TO_TORCH, TensorMeta


def data_start(path: Path) -> int:
    """Byte offset where a safetensors file's tensor data begins (8 + header length)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise InputError(f"{path.name} is too short to be a safetensors file.", hint="Re-download the file.")
    return 8 + struct.unpack("<Q", head)[0]


@dataclass
class BufferPool:
    """Byte buffers handed out round-robin: one holding the piece being merged, one being read into.

    One buffer per turn holds every input's bytes of a piece, side by side: the engine's read
    memory is then two pieces, whatever the number or sizes of the models. A buffer is kept from
    turn to turn (no fresh pages to fault in) and given back only when it is much larger than both
    the request and `keep` (a piece larger than the unit budget must not pin its memory after).
    """

    slots: int = 2
    keep: int = 0
    _buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    _turn: int = 0

    def take(self, nbytes: int) -> torch.Tensor:
        turn = self._turn
        self._turn = (turn + 1) % self.slots
        buf = self._buffers.get(turn)
        limit = max(nbytes, self.keep)
        if buf is None or buf.numel() < nbytes or buf.numel() > limit + limit // 4 + (1 << 20):
            self._buffers.pop(turn, None)
            buf = self._buffers[turn] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]


def _readinto(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise InputError(f"{path.name} ended early while reading (truncated?).", hint="Re-download the file.")
        done += n


def _runs(metas: list[TensorMeta]) -> list[list[TensorMeta]]:
    """The tensors grouped into runs that lie back to back in the file (one read each)."""
    metas = sorted(metas, key=lambda m: m.data_offsets[0])
    runs: list[list[TensorMeta]] = [[metas[0]]] if metas else []
    for m in metas[1:]:
        if m.data_offsets[0] == runs[-1][-1].data_offsets[1]:
            runs[-1].append(m)
        else:
            runs.append([m])
    return runs


def advise(path: Path, metas: list[TensorMeta]) -> None:
    """Ask the kernel to start reading these tensors' bytes into the page cache now (no waiting).

    Issued for the piece after the one being read, so the disk is never idle between two reads
    (one prefetched piece alone leaves it idle while the reader thread waits for the merge).
    """
    if not metas or not hasattr(os, "posix_fadvise"):
        return
    start = data_start(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for run in _runs(metas):
            lo, hi = run[0].data_offsets[0], run[-1].data_offsets[1]
            os.posix_fadvise(fd, start + lo, hi - lo, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def read_tensors(path: Path, metas: list[TensorMeta], buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The given tensors of one file, read with one large read per contiguous run.

    With `buffer` (uint8, at least the runs' total size) the tensors are views into it;
    otherwise a fresh buffer is allocated.
    """
    if not metas:
        return {}
    runs = _runs(metas)
    total = sum(r[-1].data_offsets[1] - r[0].data_offsets[0] for r in runs)
    buf = buffer[:total] if buffer is not None else torch.empty(total, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    start = data_start(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        mv = memoryview(buf.numpy())
        for run in runs:
            lo, hi = run[0].data_offsets[0], run[-1].data_offsets[1]
            _readinto(fd, mv[pos:pos + hi - lo], start + lo, path)
            for m in run:
                raw = buf[pos + m.data_offsets[0] - lo: pos + m.data_offsets[1] - lo]
                dtype = ST_TO_TORCH[m.dtype]
                if raw.numel() and raw.storage_offset() % raw.new_empty((), dtype=dtype).element_size():
                    raw = raw.clone()  # a misaligned tensor cannot be viewed in place
                out[m.name] = raw.view(dtype).reshape(m.shape) if raw.numel() else torch.empty(m.shape, dtype=dtype)
            pos += hi - lo
    finally:
        os.close(fd)
    return out
