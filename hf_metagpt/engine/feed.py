"""The feed: how a run's pieces come off the disk, one step ahead of the merge.

`Feed` is the executor's only view of reading. `PieceFeed` reads each piece of every input into
one pooled buffer on a reader thread, one step ahead of the step being merged, and releases each
file after its last read (low-disk). Where the files are on disk is the `FileProvider`'s business
(local folders, Hub shards downloaded while merging, or fetched one group ahead with `--low-disk`);
the feed is told once, by the run's shape, whether the files are local (direct I/O and readahead
pay only there).

A feed that reads on several threads or into device memory implements the same protocol: the
executor calls `start`, `pieces`, `prepare`, `walk`, `read_base`, `read`, `stop` — nothing else.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..constants import direct_io_enabled
from ..safetensors_io import TensorMeta
from ..sources.model import ModelInfo
from .fetch import FileProvider
from .pieces import Piece, piece_bytes, piece_metas, split_group
from .plan import MergePlan
from .reader import DIRECT_SLACK, BufferPool
from .schedule import Schedule, Step, last_reads, piece_key, read_once
from .staging import Stager
from .tasks import TaskSource, advise_metas, read_metas
from .timeline import Meter, clocks

log = logging.getLogger(__name__)

#: Seconds a failed or interrupted merge waits for download threads to end (a request stalled on
#: the network is left to its daemon thread rather than holding up the error or Ctrl-C).
CANCEL_WAIT = 2.0

#: One piece's tensors: [base tensors by name (None: not read), then each source's].
Raws = list


@dataclass
class FeedCounts:
    """What a feed read: bytes (pooled and not), pooled reads, the largest pooled read."""

    bytes_read: int = 0
    pieces_read: int = 0
    largest_read: int = 0


class Feed(Protocol):
    """Reads a run's pieces for the executor, which starts and stops it (it owns the feed's threads)."""

    counts: FeedCounts
    #: time inside reads, summed over the reading threads (`timeline`)
    busy: Meter
    #: threads reading one piece's inputs side by side (recorded in the run's statistics)
    readers: int
    #: the pieces must be read in plan order (a low-disk provider fetches just ahead, deletes behind)
    sequential: bool

    def start(self) -> None: ...

    def stop(self, *, cancel: bool) -> None:
        """Stop reading: the file provider first (a read waiting for a download then fails at once)."""

    def pieces(self, *, slabs: bool) -> list[list[Piece]]:
        """Each stream group of the plan cut into pieces this feed reads at once (`pieces.split_group`)."""

    def prepare(self, steps: Schedule) -> None:
        """Told the whole schedule before the first read (which pieces are read once)."""

    def walk(self, steps: Sequence[Step], desc: str, with_base: Callable[[Step], bool],
             progress: bool) -> Iterator[tuple[Step, Raws]]:
        """Each step with its piece's tensors, in order; the next piece is read meanwhile."""

    def read_base(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The base's tensors of a piece, read now (outside the pooled buffer)."""

    def read(self, piece: Piece, with_base: bool = True) -> Raws:
        """One piece's tensors, read now."""


class PieceFeed:
    """Reads pieces of the base and every source into a pooled buffer, one step ahead (see the module).

    Args:
        plan: the merge plan.
        sources: the fine-tunes as the engine reads them (`tasks.sources_of`).
        files: where the input files are (`fetch.LocalFiles`, `OverlappedFiles`, `LowDiskFiles`).
        unit: bytes of all inputs read at once (`pieces.unit_bytes`).
        local: every file is on a local disk already (direct reads and readahead hints pay).
        readers: threads reading one piece's inputs side by side (local files only; `sizing`):
            each input's bytes go to their own place in the pooled buffer, so the piece is the
            same whatever the count.
        stager: copies each piece read to the GPU on the reading thread (`staging`), from
            page-locked pooled buffers; None: the kernel copies what it needs.
    """

    def __init__(self, plan: MergePlan, sources: Sequence[TaskSource], files: FileProvider, unit: int, *,
                 local: bool, readers: int = 1, stager: Stager | None = None) -> None:
        self.plan = plan
        self.sources = tuple(sources)
        self.files = files
        self.unit = unit
        self.local = local
        self.counts = FeedCounts()
        self.busy = Meter()
        self.stager = stager
        # one piece in use, the next one being read (page-locked when staged to a GPU)
        self.pool = BufferPool(slots=2, keep=unit, pinned=stager is not None and stager.pinned)
        self._reader: ThreadPoolExecutor | None = None
        self.readers = max(1, readers) if local else 1
        self._parts: ThreadPoolExecutor | None = None
        self._once: frozenset = frozenset()  # pieces this run reads with O_DIRECT (`prepare`)
        self._stopped = False

    @property
    def sequential(self) -> bool:
        return self.files.sequential

    def start(self) -> None:
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-read")
        if self.readers > 1:
            self._parts = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="hf-metagpt-read-part")

    def stop(self, *, cancel: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.files.close(timeout=CANCEL_WAIT if cancel else None)
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=cancel)
            self._reader = None
        if self._parts is not None:
            self._parts.shutdown(wait=True, cancel_futures=cancel)
            self._parts = None

    def _pooled_infos(self) -> list[ModelInfo | None]:
        """The inputs read into the pooled buffer (base and full fine-tunes; adapters read their own)."""
        return [self.plan.base] + [s.info if s.pooled else None for s in self.sources]

    def pieces(self, *, slabs: bool) -> list[list[Piece]]:
        infos = self._pooled_infos()
        return [split_group(g, infos, self.unit, slabs=slabs) for g in self.plan.groups]

    def prepare(self, steps: Schedule) -> None:
        # A Hub file was just downloaded, so it is in the page cache anyway: local files only.
        self._once = read_once(steps) if self.local and direct_io_enabled() else frozenset()

    def _direct(self, step: Step) -> bool:
        """Read this step's piece with O_DIRECT: local files that no other step reads (`read_once`)."""
        return piece_key(step.piece) in self._once

    def _files_of(self, step: Step) -> list[tuple[int, str]]:
        """(input, file) pairs a step reads (for releasing low-disk files after their last use)."""
        out = [(0, self.plan.base.tensors[tp.name].file) for tp in step.piece.tensors]
        for src in self.sources:
            out += [(src.index, f) for f in src.files_of(list(step.piece.tensors))]
        return out

    def walk(self, steps: Sequence[Step], desc: str, with_base: Callable[[Step], bool],
             progress: bool) -> Iterator[tuple[Step, Raws]]:
        """Yield (step, its tensors) in order, reading the next step's piece on the reader thread meanwhile.

        Reads are I/O and release the GIL, so the disk works while the caller merges; after each
        step, the files no later step of this pass reads are released (low-disk mode).
        """
        assert self._reader is not None, "start the feed first"
        done_after = last_reads(steps, self._files_of)
        # Prefetch only while two pieces fit in two units: a tensor larger than the unit that
        # could not be cut (TIES/DARE, adapters) is read on its own, or it would set the peak.
        infos = self._pooled_infos()
        sizes = [piece_bytes(s.piece, infos) for s in steps]
        budget = 2 * self.unit

        def read_next(k: int) -> Raws:
            # Local files: the piece after this one is asked of the disk before this one is read,
            # so the disk keeps reading while the caller waits for the merge.
            if k + 1 < len(steps) and self.local and not self._direct(steps[k + 1]):
                self._advise(steps[k + 1])  # (a direct read would then find it cached and copy it)
            return self.read(steps[k].piece, with_base=with_base(steps[k]), direct=self._direct(steps[k]))

        reader = self._reader
        pending = reader.submit(read_next, 0) if steps else None
        for k, step in enumerate(_progress(steps, desc, progress)):
            raws = pending.result()  # type: ignore[union-attr]
            ahead = k + 1 < len(steps) and sizes[k] + sizes[k + 1] <= budget
            pending = reader.submit(read_next, k + 1) if ahead else None
            try:
                yield step, raws
            finally:
                del raws
            if pending is None and k + 1 < len(steps):
                pending = reader.submit(read_next, k + 1)
            for i, file in done_after.get(k, ()):
                self.files.release(i, self.plan.inputs[i], file)

    def _advise(self, step: Step) -> None:
        """Readahead of a step's pooled inputs (`tasks.advise_metas`); a failure only loses the hint."""
        try:
            advise_metas(self.plan.base, 0, piece_metas(step.piece, self.plan.base, 0), self.files)
            for src in self.sources:
                if src.pooled:
                    advise_metas(src.info, src.index, src.metas(step.piece), self.files)
        except OSError as exc:
            log.debug("readahead hint failed: %s", exc)

    def read_base(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The base's tensors of a piece, read on demand (not pooled: both pool turns are in use)."""
        start = clocks()
        data, n = read_metas(self.plan.base, 0, piece_metas(piece, self.plan.base, 0), self.files)
        self.busy.add_since(start)
        self.counts.bytes_read += n
        return data

    def read(self, piece: Piece, with_base: bool = True, direct: bool = False) -> Raws:
        """[base tensors (None when not read), then each source's] for one piece.

        Every input's bytes share one pooled buffer, side by side. `direct`: no later step reads
        this piece again, so runs not in the page cache are read with O_DIRECT (`reader`).
        """
        parts: list[tuple[ModelInfo, int, list[TensorMeta]]] = []
        if with_base:
            parts.append((self.plan.base, 0, piece_metas(piece, self.plan.base, 0)))
        parts += [(src.info, src.index, src.metas(piece)) for src in self.sources if src.pooled]
        slack = DIRECT_SLACK if direct else 0
        buf = self.pool.take(sum(m.nbytes + slack for _, _, metas in parts for m in metas))
        raws: Raws = [None] * len(self.plan.inputs)
        jobs = []
        pos = 0
        for info, i, metas in parts:
            size = sum(m.nbytes + slack for m in metas)
            jobs.append((info, i, metas, buf[pos:pos + size]))
            pos += size

        busy = self.busy

        def one(job: tuple) -> tuple:
            info, i, metas, into = job
            start = clocks()
            out = read_metas(info, i, metas, self.files, into, direct=direct)
            busy.add_since(start)
            return out

        pool = self._parts
        done = list(pool.map(one, jobs)) if pool is not None and len(jobs) > 1 else [one(j) for j in jobs]
        read = 0
        for (_, i, _, _), (data, n) in zip(jobs, done):
            raws[i] = data
            read += n
        counts = self.counts
        counts.bytes_read += read
        counts.pieces_read += 1
        counts.largest_read = max(counts.largest_read, read)
        for src in self.sources:
            if not src.pooled:
                start = clocks()
                raws[src.index], n = src.read(piece)
                busy.add_since(start)
                counts.bytes_read += n
        if self.stager is not None:  # the device copies, on this reading thread (counted as reading)
            start = clocks()
            self.stager.stage(raws)
            busy.add_since(start)
        return raws


def _progress(items: Sequence, desc: str, enabled: bool):
    if not enabled:
        return items
    from huggingface_hub.utils import tqdm

    return tqdm(items, desc=desc, unit="group")
