"""Writing output shards: each tensor at its planned offset, fsynced, recorded, then renamed into place.

Before a finished shard is renamed into place, the run's progress file is saved atomically: the
norm ledger (every group whose λ the shard's tensors used) and the CRC-32 of each tensor of every
shard finished so far. A resumed run keeps a shard only when its header, size and every tensor's
CRC match that record, so a kill at any point loses neither a λ row nor trust in a shard, and a
file some other run left behind is never taken for ours.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from pathlib import Path

import torch

from ..errors import InputError
from ..safetensors_io import build_header, disk_full_is_clear, parse_header_json
from .ledger import PROGRESS_FILE, PROGRESS_FILES, write_json_atomic
from .plan import MergePlan, TensorPlan
from .stats import StreamStats


def _entries(tensors: list[TensorPlan]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.out_dtype, t.out_shape) for t in tensors]


class ShardSink:
    """Writes merged tensors into their shards, in plan order, on the writer thread it owns.

    Writing is mostly the kernel copying into the page cache and throttling on write-back; on
    its own thread it overlaps with reading and merging the next tensors. Merged tensors wait
    while they hold at most `max_bytes` together (always at least one), so memory stays bounded:
    with the output arena's two turns, a piece's tensors are written while the next piece merges
    (a bound of one tensor made the merge wait for each write). A finished shard is fsynced,
    recorded in the progress file (with the ledger state that came with its last tensor), then
    renamed into place.
    """

    def __init__(self, plan: MergePlan, work_dir: Path, stats: StreamStats, *, progress_name: str = PROGRESS_FILE,
                 max_bytes: int = 0) -> None:
        self.plan = plan
        self.work_dir = work_dir
        self.stats = stats
        self.max_bytes = max_bytes
        self.progress_name = progress_name
        self.writers: dict[int, ShardWriter] = {}
        self.crcs: dict[str, list[int]] = {}  # finished shards of this run: CRC-32 of each tensor
        self._ledger: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-write")
        self._pending: deque[tuple[Future, int]] = deque()  # (write, bytes it holds)
        self._waiting = 0
        self._failed = False  # set on the writer thread by the first failed write

    def put(self, tp: TensorPlan, tensor: torch.Tensor, part: bool = False, ledger: dict | None = None) -> Future:
        """Queue a merged tensor (`part`: its next rows; the tensor is complete with its last slab).

        `ledger`: the norm ledger's state once this tensor's group was complete (saved with the
        shard that holds it, before that shard is renamed into place). Returns the write's future:
        the tensor's memory may be reused once it is done (`OutputArena.hold`).
        """
        fut = self._pool.submit(self._write, tp, tensor, part, ledger)
        self._pending.append((fut, tensor.numel() * tensor.element_size()))
        self._waiting += self._pending[-1][1]
        while len(self._pending) > 1 and (self._waiting > self.max_bytes or self._pending[0][0].done()):
            done, n = self._pending.popleft()
            self._waiting -= n
            done.result()  # re-raises the writer's error here
        return fut

    def _write(self, tp: TensorPlan, tensor: torch.Tensor, part: bool, ledger: dict | None) -> None:
        # Writes queued behind a failed one are not done: the error (a full disk, a kill) stops
        # the shards as it finds them, as if each write had been waited for.
        if self._failed:
            raise RuntimeError("an earlier write failed")
        try:
            self._write_one(tp, tensor, part, ledger)
        except BaseException:
            self._failed = True
            raise

    def _write_one(self, tp: TensorPlan, tensor: torch.Tensor, part: bool, ledger: dict | None) -> None:
        if ledger is not None:
            self._ledger = ledger
        w = self.writers.get(tp.shard)
        if w is None:
            shard = self.plan.shards[tp.shard]
            w = self.writers[tp.shard] = ShardWriter(self.work_dir / (shard.file + ".tmp"), _entries(shard.tensors))
        w.write(tp.name, tensor, part=part)
        if w.done:
            w.close()
            shard = self.plan.shards[tp.shard]
            self.crcs[shard.file] = [w.crcs[t.name] for t in shard.tensors]
            try:
                # The progress record is part of finishing the shard: a full disk here is the
                # shard's, said as clearly, and its unrecorded bytes are not kept.
                with disk_full_is_clear(self.work_dir / shard.file):
                    self.save_progress()
            except BaseException:
                del self.crcs[shard.file]
                w.path.unlink(missing_ok=True)
                raise
            w.path.rename(self.work_dir / shard.file)
            self.stats.bytes_written += w.size
            del self.writers[tp.shard]

    def save_progress(self, ledger: dict | None = None) -> None:
        """The ledger and the finished shards' CRCs, atomically (before a shard is renamed)."""
        if ledger is not None:
            self._ledger = ledger
        write_json_atomic(self.work_dir / self.progress_name, {**self._ledger, "shards": self.crcs})

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()
        self._pool.shutdown()

    def abort(self) -> None:
        for fut, _ in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)
        for w in self.writers.values():
            w.abort()


#: Byte alignment of each tensor carved from an arena buffer (a cache line; every dtype's size divides it).
ALIGN = 64


class OutputArena:
    """Reused memory for the merged tensors of a piece: one buffer per turn, carved tensor by tensor.

    A fresh `torch.empty` for every merged tensor is a fresh mapping from the allocator: each of
    its pages is faulted in and zeroed by the kernel, then unmapped once the writer is done — for a
    1.1B merge, 2.2 GB of page faults (measured: over a second of system time per pass). Here a
    piece's merged tensors are carved from the buffer of its turn, and that buffer comes back two
    pieces later, once every write that reads from it has finished (`hold`). A buffer grows to the
    largest piece's output seen on its turn; a request that does not fit gets fresh memory this
    turn (so the first pieces, or a method whose outputs are not carved, work as before).
    """

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self._buffers: dict[int, torch.Tensor] = {}
        self._need: dict[int, int] = {}
        self._held: dict[int, list[Future]] = {}
        self._turn = 0
        self._carver: "_Carver | None" = None

    def take(self) -> "_Carver":
        """The allocator for the next piece's merged tensors (waits for the writes of this turn's last use)."""
        turn = self._turn
        self._turn = (turn + 1) % self.slots
        wait_all(self._held.pop(turn, []))
        need = self._need.get(turn, 0)
        buf = self._buffers.get(turn)
        if need and (buf is None or buf.numel() < need):
            self._buffers.pop(turn, None)
            buf = self._buffers[turn] = torch.empty(need, dtype=torch.uint8)
        self._carver = _Carver(self, turn, buf)
        return self._carver

    def hold(self, fut: Future) -> None:
        """A write reading from the current piece's tensors: their buffer waits for it."""
        if self._carver is not None:
            self._held.setdefault(self._carver.turn, []).append(fut)


class _Carver:
    """`alloc(shape, dtype)`: tensors side by side in one arena buffer (fresh memory once it is full)."""

    def __init__(self, arena: OutputArena, turn: int, buf: torch.Tensor | None) -> None:
        self.arena = arena
        self.turn = turn
        self.buf = buf
        self.want = 0  # bytes this piece asked for so far

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        start = self.want
        self.want = start + (n + ALIGN - 1) // ALIGN * ALIGN
        arena = self.arena
        arena._need[self.turn] = max(arena._need.get(self.turn, 0), self.want)
        if self.buf is None or self.want > self.buf.numel() or n == 0:
            return torch.empty(shape, dtype=dtype)
        return self.buf[start:start + n].view(dtype).view(shape)


def shard_header(plan: MergePlan, k: int) -> bytes:
    header, _ = build_header(_entries(plan.shards[k].tensors), {"format": "pt"})
    return header


def recorded_crcs(work_dir: Path) -> dict[str, list[int]]:
    """CRC-32s of the shards earlier runs finished in this work folder (every process's record)."""
    out: dict[str, list[int]] = {}
    for path in sorted(work_dir.glob(PROGRESS_FILES)):
        try:
            shards = json.loads(path.read_text()).get("shards", {})
            out.update({str(f): [int(c) for c in crcs] for f, crcs in shards.items()})
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return out


def finished_shards(plan: MergePlan, work_dir: Path, only: set[int] | None = None) -> set[int]:
    """Shards a previous run completed: same header, full size and every tensor's recorded CRC-32.

    `only`: look at these shards alone (one process of a shared merge; others are being written).
    A shard without a record (renamed by another program, or before the record was kept) is
    rewritten.
    """
    crcs = recorded_crcs(work_dir)
    return {k for k, s in enumerate(plan.shards) if (only is None or k in only) and s.file in crcs
            and (work_dir / s.file).is_file() and shard_matches(work_dir / s.file, shard_header(plan, k))
            and shard_crcs(work_dir / s.file, len(shard_header(plan, k)), plan.shards[k].tensors) == crcs[s.file]}


def shard_crcs(path: Path, header_len: int, tensors: list[TensorPlan]) -> list[int] | None:
    """CRC-32 of each tensor's bytes of a shard file, in plan order (None if it cannot be read)."""
    _, offsets = build_header(_entries(tensors), {"format": "pt"})
    out = []
    try:
        with open(path, "rb") as f:
            for t in tensors:
                begin, end = offsets[t.name]
                f.seek(header_len + begin)
                crc, left = 0, end - begin
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    if not chunk:
                        return None
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
                out.append(crc)
    except OSError:
        return None
    return out


# Test-only: seconds to sleep after each finished shard, so a test can kill a merge mid-write.
SLOW_WRITE_ENV = "HF_METAGPT_TEST_SLOW_WRITE"


#: Bytes written between two requests to start writing a shard back to disk (see ShardWriter).
WRITEBACK_STEP = 64 << 20


class ShardWriter:
    """Writes one safetensors shard; its tensors may arrive in any order, each one whole or in row slabs.

    The header (and so every tensor's place) is known from the plan, so each tensor is written at
    its own offset (`os.pwrite`): no shard buffer, and the engine may merge a shard's groups in any
    order (pass 2 of a two-pass merge runs backwards, see `stream`). Row slabs of one tensor come
    in row order. The shard is `done` once every tensor has all its bytes.

    The kernel keeps written pages dirty until a background threshold (a tenth of RAM) or the
    fsync at `close`, so a 1 GB shard would reach the disk only when it is finished, with the
    merge waiting on that fsync. Every `WRITEBACK_STEP` bytes the writer asks the kernel to start
    writing them back now (`posix_fadvise(DONTNEED)` starts write-back of dirty pages and drops the
    clean ones: nobody reads the output back during the merge), so the disk writes while the
    merge goes on and the final fsync has little left to do.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = path
        self.header, self.offsets = build_header(entries, {"format": "pt"})
        self.size = len(self.header) + (max((o[1] for o in self.offsets.values()), default=0))
        self._left = {name: end - begin for name, (begin, end) in self.offsets.items()}
        self._pending = set(self._left)  # tensors not complete yet (empty ones too, until written)
        self._unsynced: list[tuple[int, int]] = []  # (offset, length) written since the last write-back
        self.crcs = {name: 0 for name in self._left}  # CRC-32 of each tensor's bytes (slabs come in row order)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with disk_full_is_clear(self.path):
                _pwrite_all(self._fd, memoryview(self.header), 0)
        except BaseException:
            self.abort()  # not handed to anyone yet: nobody else would remove it
            raise

    def write(self, name: str, tensor: torch.Tensor, *, part: bool = False) -> None:
        """Write a tensor at its place; with `part`, its next rows (it is done once all its bytes came)."""
        if name not in self._pending:
            raise RuntimeError(f"shard {self.path.name}: got {name}, which it "
                               + ("already has" if name in self._left else "does not hold"))
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        left = self._left[name]
        if len(data) > left or (not part and len(data) != left):
            raise RuntimeError(f"{name}: {len(data)} bytes, planned {left} more")
        pos = len(self.header) + self.offsets[name][1] - left
        if len(data):
            with disk_full_is_clear(self.path):
                _pwrite_all(self._fd, memoryview(data), pos)
            self.crcs[name] = zlib.crc32(memoryview(data), self.crcs[name])
            self._unsynced.append((pos, len(data)))
        self._left[name] = left - len(data)
        if not self._left[name]:
            self._pending.discard(name)
        if sum(n for _, n in self._unsynced) >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        if hasattr(os, "posix_fadvise"):
            for pos, n in self._unsynced:
                os.posix_fadvise(self._fd, pos, n, os.POSIX_FADV_DONTNEED)
        self._unsynced = []

    @property
    def done(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """Flush to disk; the caller renames the file into place only after this."""
        with disk_full_is_clear(self.path):
            os.fsync(self._fd)
        os.close(self._fd)
        if delay := float(os.environ.get(SLOW_WRITE_ENV) or 0):
            time.sleep(delay)  # test-only (see SLOW_WRITE_ENV)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def shard_matches(path: Path, header: bytes) -> bool:
    """True when a finished shard on disk has exactly this header and its full size (resume)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                return False
        (n,) = struct.unpack("<Q", header[:8])
        metas = parse_header_json(header[8:], path.name)
        need = 8 + n + max((m.data_offsets[1] for m in metas.values()), default=0)
        return path.stat().st_size == need
    except (OSError, InputError):
        return False
