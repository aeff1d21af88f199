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

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._platform import page_cached
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
    #: page-locked buffers (a GPU run's `staging`: host→device copies at the bus's speed)
    pinned: bool = False
    _buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    _turn: int = 0

    def take(self, nbytes: int) -> torch.Tensor:
        turn = self._turn
        self._turn = (turn + 1) % self.slots
        buf = self._buffers.get(turn)
        limit = max(nbytes, self.keep)
        if buf is None or buf.numel() < nbytes or buf.numel() > limit + limit // 4 + (1 << 20):
            self._buffers.pop(turn, None)
            buf = self._buffers[turn] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
        return buf[:nbytes]


def _truncated(path: Path) -> InputError:
    return InputError(f"{path.name} ended early while reading (truncated?).", hint="Re-download the file.")


def _readinto(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise _truncated(path)
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


#: Block size of direct reads and writes: file offsets, lengths and memory addresses are multiples
#: of it (4 KiB: a multiple of every disk's logical block size).
BLOCK = 4096
#: Extra bytes of the pooled buffer per tensor read directly: a run's start and end are widened to
#: whole blocks, and its place in the buffer is moved to a block boundary.
DIRECT_SLACK = 3 * BLOCK


def read_tensors(path: Path, metas: list[TensorMeta], buffer: torch.Tensor | None = None,
                 direct: bool = False) -> dict[str, torch.Tensor]:
    """The given tensors of one file, read with one large read per contiguous run.

    With `buffer` (uint8, at least the runs' total size; `DIRECT_SLACK` more per tensor when
    `direct`) the tensors are views into it; otherwise a fresh buffer is allocated.

    `direct`: a run that is not in the page cache (probed with a non-blocking read of its middle
    page) is read with O_DIRECT straight into the buffer: a merge that reads each byte once has no
    use for the page cache, and filling it costs the CPU a copy and a fresh page per 4 KiB (on this
    project's VM, more than the merge's arithmetic). A run already cached is copied from it.
    """
    return read_tensors_into(path, metas, buffer, direct)[0]


def read_tensors_into(path: Path, metas: list[TensorMeta], buffer: torch.Tensor | None = None,
                      direct: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """`read_tensors`, and how many bytes of `buffer` it used."""
    if not metas:
        return {}, 0
    runs = _runs(metas)
    total = sum(r[-1].data_offsets[1] - r[0].data_offsets[0] for r in runs)
    if direct:
        total += DIRECT_SLACK * len(metas)
    buf = buffer[:total] if buffer is not None else torch.empty(total, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    start = data_start(path)
    fd = os.open(path, os.O_RDONLY)
    dfd: int | None = None
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        mv = memoryview(buf.numpy())
        typed: dict[torch.dtype, torch.Tensor] = {}
        for run in runs:
            lo, hi = run[0].data_offsets[0], run[-1].data_offsets[1]
            at = None
            if direct and hi > lo and page_cached(fd, start + (lo + hi) // 2) is False:
                if dfd is None:
                    dfd = _open_direct(path)
                if dfd is not None:
                    at, pos = _read_direct(dfd, buf, mv, pos, start + lo, start + hi, path)
            if at is None:
                _readinto(fd, mv[pos:pos + hi - lo], start + lo, path)
                at, pos = pos, pos + hi - lo
            _views(buf, total, at, lo, run, out, typed)
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    return out, pos


def _views(buf: torch.Tensor, nbytes: int, at: int, lo: int, run: list[TensorMeta],
           out: dict[str, torch.Tensor], typed: dict[torch.dtype, torch.Tensor]) -> None:
    """The tensors of a run read to `buf[at:]` (file offset `lo` there), as typed views of `buf` (`nbytes` long).

    One typed view of `buf` per dtype (`typed`, shared by the runs of a read) and one `as_strided`
    per tensor: each torch call gives up and takes back the GIL, which on a busy many-core merge
    can mean waiting for it, so a tensor costs one call instead of six.
    """
    origin = buf.storage_offset()  # bytes: `buf` is uint8
    for m in run:
        dtype = ST_TO_TORCH[m.dtype]
        size = dtype.itemsize
        begin, end = m.data_offsets
        shape = tuple(m.shape)
        if begin == end:
            out[m.name] = torch.empty(shape, dtype=dtype)
            continue
        rel = at + begin - lo  # the tensor's first byte in `buf`
        if (origin + rel) % size:
            # a misaligned tensor cannot be viewed in place
            out[m.name] = buf[rel: rel + end - begin].clone().view(dtype).reshape(shape)
            continue
        view = typed.get(dtype)
        if view is None:
            first = -origin % size  # the first byte of `buf` a `dtype` view may start at
            view = typed[dtype] = buf[first: first + (nbytes - first) // size * size].view(dtype)
        out[m.name] = view.as_strided(shape, contiguous_strides(shape), (origin + rel) // size)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape` (for `as_strided`: one torch call per tensor)."""
    strides, stride = [], 1
    for d in reversed(shape):
        strides.append(stride)
        stride *= d
    return tuple(reversed(strides))


def _open_direct(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # a file system without O_DIRECT: buffered reads
        return None


def _read_direct(dfd: int, buf: torch.Tensor, mv: memoryview, pos: int, lo: int, hi: int,
                 path: Path) -> tuple[int | None, int]:
    """Bytes [lo, hi) of the file by whole aligned blocks into `buf` at or after `pos`.

    Returns (where byte `lo` landed, the buffer position after the blocks), or (None, pos) when the
    file system refuses the read (the caller then reads it buffered).
    """
    a, b = lo // BLOCK * BLOCK, -(-hi // BLOCK) * BLOCK
    pad = -(buf.data_ptr() + pos) % BLOCK
    dst = mv[pos + pad: pos + pad + (b - a)]
    done, need = 0, hi - a
    while done < need:
        try:
            n = os.preadv(dfd, [dst[done:]], a + done)
        except OSError as exc:
            if exc.errno == errno.EINVAL and done == 0:
                return None, pos
            raise
        if n <= 0:
            raise _truncated(path)
        done += n
        if done < need and done % BLOCK:
            raise _truncated(path)
    return pos + pad + (lo - a), pos + pad + (b - a)
