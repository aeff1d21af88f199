"""Run a schedule: read pieces, reduce norms into the ledger, merge, write shards.

The executor owns every thread of a merge — the prefetch reader, the compute workers, the shard
writer, and (through `close`) the download threads of a Hub file provider — and has one way to
stop them: on any error or Ctrl-C it first stops the providers (so a read waiting for a download
fails at once), then cancels pending reads and writes, and joins everything before the error
leaves `run`. A normal end joins them in the same order.

Memory stays at about two pieces of all inputs (`pieces`: a transformer block when it fits the
unit budget, else some of its tensors or a row slab of one) plus the merged tensors of one piece.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from ..methods.base import MergeMethod
from ..safetensors_io import TensorMeta
from ..sources.model import ModelInfo
from .fetch import FileProvider, LocalFiles
from .ledger import PROGRESS_FILE, NormLedger
from .merging import FusedKernel, KernelContext, MergeKernel, MethodKernel, Record, choose_kernel, compute_workers
from .pieces import Piece, piece_bytes, piece_metas, split_group, unit_bytes
from .plan import MergePlan
from .reader import DIRECT_SLACK, BufferPool, direct_io_enabled
from .schedule import Schedule, Step, last_reads, piece_key, read_once, schedule
from .stats import StreamStats
from .tasks import TaskSource, advise_metas, read_metas
from .writer import OutputArena, ShardSink, finished_shards

if TYPE_CHECKING:
    from .distributed import Share

log = logging.getLogger(__name__)

#: Seconds a failed or interrupted merge waits for download threads to end (a request stalled on
#: the network is left to its daemon thread rather than holding up the error or Ctrl-C).
CANCEL_WAIT = 2.0


class Executor:
    """Runs a `MergePlan` with a `MergeMethod` into a work folder; see the module docstring."""

    def __init__(self, plan: MergePlan, method: MergeMethod, work_dir: Path, *, device: torch.device,
                 ledger: NormLedger, files: FileProvider | None = None, seed: int | None = None,
                 allow_nonfinite: bool = False, progress: bool = True, share: "Share | None" = None) -> None:
        self.plan = plan
        self.method = method
        self.work_dir = work_dir
        self.device = device
        self.ledger = ledger
        self.files = files or LocalFiles()
        self.progress = progress
        self.share = share  # this process's part of a multi-process merge (`distributed`); None: all of it
        self.stats = StreamStats()
        self.coefficients: dict[str, list[float]] = {}
        self.sources = tuple(self._source(info, i, allow_nonfinite) for i, info in enumerate(plan.models, 1))
        kernel_cls = choose_kernel(method, self.sources, allow_nonfinite)
        self.workers = compute_workers(kernel_cls, device, share.count if share is not None else 1)
        self.kernel: MergeKernel = kernel_cls(KernelContext(plan, method, self.sources, device, seed,
                                                            allow_nonfinite, run=self._map))
        self.unit = unit_bytes()
        self.pool = BufferPool(slots=2, keep=self.unit)  # one piece in use, the next one being read
        self.arena = OutputArena(slots=2)  # one piece's merged tensors being written, the next one's merged
        self._reader: ThreadPoolExecutor | None = None
        self._compute: ThreadPoolExecutor | None = None
        self._sink: ShardSink | None = None
        self._stopped = False
        self._once: frozenset = frozenset()  # pieces this run reads with O_DIRECT (`_direct`)

    def _source(self, info: ModelInfo, index: int, allow_nonfinite: bool) -> TaskSource:
        check = self._check_input
        if info.ref.is_adapter:
            from .tasks import AdapterSource

            return AdapterSource(info, index, self.files, self.device, check)
        return TaskSource(info, index, self.files, self.device, check)

    def _check_input(self, t: torch.Tensor, model: str, name: str) -> None:
        self.kernel.check_finite(t, model, name)

    @property
    def precision(self) -> str:
        """What the weighted sums accumulate in (float64 for the fused and low-rank kernels)."""
        return self.kernel.precision

    # ------------------------------------------------------------------ threads: one owner, one way out
    def run(self, *, reduce_only: bool = False) -> None:
        """Merge into the work folder, reusing finished shards and the ledger's known norms.

        `reduce_only`: pass 1 alone (`inspect`): every tensor's norms and Gram matrices into the
        ledger, nothing written. Needs a plan whose norm groups span stream groups (granularity model).
        """
        threads = torch.get_num_threads()
        if self.kernel.threaded and self.device.type == "cpu":
            # The fused kernels work on cache-sized chunks: splitting each over OpenMP threads
            # costs more than it gains (measured 10-30x slower on a busy 2-core machine), and the
            # other core is better spent on the prefetch thread's reads.
            torch.set_num_threads(1)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-read")
        if self.workers > 1:
            # Single-threaded like this thread: OpenMP's thread count is per thread, and a worker
            # left at the default would split BLAS reductions (the norms) by the core count, so
            # the same merge would differ in the last bits from machine to machine (or from one
            # `accelerate launch` process, which torchrun gives one thread).
            self._compute = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hf-metagpt-merge",
                                               initializer=torch.set_num_threads, initargs=(1,))
        try:
            self._reduce_only() if reduce_only else self._run()
        except BaseException:
            self._stop(cancel=True)
            raise
        finally:
            self._stop(cancel=False)
            torch.set_num_threads(threads)

    def _stop(self, *, cancel: bool) -> None:
        """Providers first (a read waiting on a download then fails at once), then readers,
        compute workers and the writer. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        close = getattr(self.files, "close", None)
        if close is not None:
            close(timeout=CANCEL_WAIT if cancel else None)
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=cancel)
            self._reader = None
        if self._compute is not None:
            self._compute.shutdown(wait=True, cancel_futures=cancel)
            self._compute = None
        if self._sink is not None:
            if cancel:
                self._sink.abort()
            self._sink = None

    def _map(self, fn: Callable, items: list) -> list:
        """fn over items, on the compute threads when there are several; results in input order."""
        if self._compute is None or len(items) < 2:
            return [fn(x) for x in items]
        return list(self._compute.map(fn, items))

    # ------------------------------------------------------------------ the run
    def plan_steps(self) -> Schedule:
        """This run's schedule, from the plan, the ledger and the finished shards (no I/O but the resume check)."""
        mine = self.share.shards if self.share is not None else None
        done = finished_shards(self.plan, self.work_dir, only=mine)
        self.stats.shards_reused = len(done)
        infos = self._pooled_infos()
        pieces = [split_group(g, infos, self.unit, slabs=self.kernel.slabs) for g in self.plan.groups]
        return schedule(self.plan, pieces, uses_norms=self.method.uses_group_norms,
                        fused=not isinstance(self.kernel, MethodKernel), known=frozenset(self.ledger.complete),
                        done=frozenset(done), owners=self.share.owners if self.share is not None else None,
                        process=self.share.index if self.share is not None else 0,
                        reverse_pass_2=not getattr(self.files, "sequential", False))

    def _direct(self, step: Step) -> bool:
        """Read this step's piece with O_DIRECT: local files that no other step reads (`read_once`)."""
        return piece_key(step.piece) in self._once

    def _run(self) -> None:
        start = time.perf_counter()
        steps = self.plan_steps()
        # A Hub file was just downloaded, so it is in the page cache anyway: local files only.
        local = isinstance(self.files, LocalFiles) and direct_io_enabled()
        self._once = read_once(steps) if local else frozenset()
        if self.share is not None:
            log.debug("process %d of %d writes shards %s", self.share.index, self.share.count,
                      sorted(k + 1 for k in self.share.shards))
        if self.method.uses_group_norms and self.plan.two_pass and steps.passes == 1:
            log.info("Squared norms known from an earlier run: pass 1 skipped.")
        self.stats.passes = steps.passes
        if steps.passes == 2:
            self._reduce_pass(steps.reduce_pass)
        self._merge_pass(steps.merge_pass)
        if self.share is not None:  # every process's norms and statistics, then λ recomputed in plan order
            self.share.share_results(self.ledger, self.stats)
            self.coefficients = {}
        self.coefficients = {g: self._coefficients(g) for g in self.plan.norm_groups
                             if not self.method.uses_group_norms or self.ledger.is_complete(g)}
        self.stats.seconds = time.perf_counter() - start

    def _reduce_only(self) -> None:
        start = time.perf_counter()
        steps = self.plan_steps()
        if steps.passes != 2:
            raise ValueError("reduce_only needs a two-pass plan (granularity model) and no known norms")
        self.stats.passes = 1
        self._reduce_pass(steps.reduce_pass)
        self.stats.seconds = time.perf_counter() - start

    def _reduce_pass(self, steps: Sequence[Step]) -> None:
        """Pass 1 of a whole-model λ: every norm group's squared norms (split over processes when shared)."""
        # Adapters' exact norms need no base weights (the method kernel reads them lazily if it must).
        read = lambda s: self._read(s.piece, with_base=isinstance(self.kernel, FusedKernel),  # noqa: E731
                                    direct=self._direct(s))
        if self.share is None:
            for step, raws in self._walk(steps, "pass 1/2: norms", read):
                self.ledger.add_records(self._reduce(step, raws))
        else:
            # Each process reduces the groups it leads, recording every tensor's squared norms; all
            # records are gathered and every process adds them in plan order, so the float64 sums
            # are the ones a single process makes, bit for bit.
            mine = {step.order: self._reduce(step, raws) for step, raws in self._walk(steps, "pass 1/2: norms", read)}
            records: dict[int, list] = {}
            for part in self.share.gather(mine):
                records.update(part)
            for k in sorted(records):
                self.ledger.add_records(records[k])
        self.ledger.finish_all()

    def _merge_pass(self, steps: Sequence[Step]) -> None:
        """Merge every piece and write its tensors into their shards (finished shards are skipped)."""
        label = "pass 2/2: merge" if self.stats.passes == 2 else "merge"
        name = PROGRESS_FILE if self.share is None else f"progress.partial.{self.share.index}.json"
        # Two pieces' merged tensors may wait for the writer (`ShardSink`): about half the unit.
        sink = self._sink = ShardSink(self.plan, self.work_dir, self.stats, progress_name=name,
                                      max_bytes=self.unit // 2)
        norms = self.method.uses_group_norms

        def read(step: Step) -> list:
            return self._read(step.piece, with_base=step.merge or self.kernel.reduce_reads_base,
                              direct=self._direct(step))

        for step, raws in self._walk(steps, label, read):
            if step.reduce:
                self.ledger.add_records(self._reduce(step, raws))
                self.ledger.finish(step.finishes)
            if not step.merge:
                continue
            outs = self.kernel.merge(step.write, raws, step.piece, _Coefficients(self), self.arena.take())
            for tp in step.write:
                # Handed over one by one: a merged tensor not carved from the arena is freed once
                # written. The ledger state goes with it: a shard is renamed into place only once
                # its groups' norms are saved.
                self.arena.hold(sink.put(tp, outs.pop(0), part=step.piece.rows is not None,
                                         ledger=self.ledger.state() if norms else None))
        sink.finish()
        sink.save_progress(self.ledger.state() if norms else None)
        self._sink = None

    def _reduce(self, step: Step, raws: list) -> list:
        return self.kernel.reduce(step.reduce_tensors, raws, step.piece, lambda: self._read_base(step.piece))

    def _coefficients(self, group: str) -> list[float]:
        if group not in self.coefficients:
            sq = self.ledger.sq(group) if self.method.uses_group_norms else None
            self.coefficients[group] = self.method.coefficients(sq, len(self.plan.models))
        return self.coefficients[group]

    # ------------------------------------------------------------------ reading
    def _pooled_infos(self) -> list[ModelInfo | None]:
        """The inputs read into the pooled buffer (base and full fine-tunes; adapters read their own)."""
        return [self.plan.base] + [s.info if s.pooled else None for s in self.sources]

    def _files_of(self, step: Step) -> list[tuple[int, str]]:
        """(input, file) pairs a step reads (for releasing low-disk files after their last use)."""
        out = [(0, self.plan.base.tensors[tp.name].file) for tp in step.piece.tensors]
        for src in self.sources:
            out += [(src.index, f) for f in src.files_of(list(step.piece.tensors))]
        return out

    def _walk(self, steps: Sequence[Step], desc: str, read: Callable[[Step], list]) -> Iterator[tuple[Step, list]]:
        """Yield (step, its tensors) in order, reading the next step's piece on the reader thread meanwhile.

        Reads are I/O and release the GIL, so the disk works while this thread merges; after each
        step, the files no later step of this pass reads are released (low-disk mode).
        """
        assert self._reader is not None
        done_after = last_reads(steps, self._files_of)
        # Prefetch only while two pieces fit in two units: a tensor larger than the unit that
        # could not be cut (TIES/DARE, adapters) is read on its own, or it would set the peak.
        infos = self._pooled_infos()
        sizes = [piece_bytes(s.piece, infos) for s in steps]
        budget = 2 * self.unit

        def read_next(k: int) -> list:
            # Local files: the piece after this one is asked of the disk before this one is read,
            # so the disk keeps reading while this thread waits for the merge.
            if k + 1 < len(steps) and isinstance(self.files, LocalFiles) and not self._direct(steps[k + 1]):
                self._advise(steps[k + 1])  # (a direct read would then find it cached and copy it)
            return read(steps[k])

        pending = self._reader.submit(read_next, 0) if steps else None
        for k, step in enumerate(_progress(steps, desc, self.progress)):
            raws = pending.result()  # type: ignore[union-attr]
            ahead = k + 1 < len(steps) and sizes[k] + sizes[k + 1] <= budget
            pending = self._reader.submit(read_next, k + 1) if ahead else None
            try:
                yield step, raws
            finally:
                del raws
            if pending is None and k + 1 < len(steps):
                pending = self._reader.submit(read_next, k + 1)
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

    def _read_base(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The base's tensors of a piece, read on demand (not pooled: both pool turns are in use)."""
        data, n = read_metas(self.plan.base, 0, piece_metas(piece, self.plan.base, 0), self.files)
        self.stats.bytes_read += n
        return data

    def _read(self, piece: Piece, with_base: bool = True, direct: bool = False) -> list:
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
        raws: list = [None] * len(self.plan.inputs)
        pos = read = 0
        for info, i, metas in parts:
            size = sum(m.nbytes + slack for m in metas)
            raws[i], n = read_metas(info, i, metas, self.files, buf[pos:pos + size], direct=direct)
            pos += size
            read += n
        self.stats.bytes_read += read
        self.stats.pieces_read += 1
        self.stats.largest_read = max(self.stats.largest_read, read)
        for src in self.sources:
            if not src.pooled:
                raws[src.index], n = src.read(piece)
                self.stats.bytes_read += n
        return raws



class _Coefficients:
    """The kernels' view of the executor's ledger (see `merging.Coefficients`)."""

    def __init__(self, executor: Executor) -> None:
        self.x = executor

    def __call__(self, group: str) -> list[float]:
        return self.x._coefficients(group)

    def pending(self, group: str) -> bool:
        return not self.x.ledger.is_complete(group)

    def settle(self, record: "Record") -> None:
        """A one-tensor norm group reduced from the τ the method path formed: reduce and apply at once."""
        self.x.ledger.add_records([record])
        self.x.ledger.finish([record[0]])


def _progress(items: Sequence, desc: str, enabled: bool):
    if not enabled:
        return items
    from huggingface_hub.utils import tqdm

    return tqdm(items, desc=desc, unit="group")
