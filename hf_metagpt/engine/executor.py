"""Run a schedule: `Executor(plan, kernel, feed, sink).run() -> RunResult`.

Three seams, each chosen once per run from its shape (`api.run_parts`), never by flags or type
probes in here:

- the **kernel** (`merging`) turns a piece's tensors into norms and merged tensors; it declares
  what it needs (row slabs, the base's weights, its compute threads);
- the **feed** (`feed`) reads the pieces, one step ahead, from wherever the files are;
- the **sink** (`sinks`) takes the merged tensors: shards, one adapter, or nothing (norms only).

The executor walks the schedule, adds norms to the ledger in plan order, and owns every thread of
a run: it starts the feed's reader, the kernel's compute workers and the sink's writer, and has
one way to stop them — on any error or Ctrl-C it first stops the feed (whose file provider's
downloads then end, so a read waiting for one fails at once), then the compute workers, then the
sink, and joins everything before the error leaves `run`. A normal end stops them in the same order.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from .feed import Feed
from .ledger import NormLedger
from .merging import MergeKernel, Record
from .schedule import Schedule, Step, schedule
from .sinks import Sink
from .stats import StreamStats
from .timeline import LoopTimes, run_queue
from .trace import Span

if TYPE_CHECKING:
    from .distributed import Share
    from .plan import MergePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunShape:
    """The shape of a run, stated once (`api.run_shape`); the feed, kernel and sink follow from it.

    Attributes:
        output: `"shards"` (safetensors shards, resumable), `"adapter"` (one merged LoRA adapter,
            `--output-format lora`) or `"norms"` (nothing written: norms and Gram matrices, `inspect`).
        files: where the inputs' files come from while the run reads them: `"local"` (on disk
            already: local folders, or Hub files downloaded before the run), `"overlapped"` (Hub
            shards downloaded into the cache while the run reads), `"low_disk"` (fetched one group
            ahead and deleted after their last read).
        processes: processes sharing the run (`distributed`); 1: this one alone.
    """

    output: str = "shards"
    files: str = "local"
    processes: int = 1

    def __post_init__(self) -> None:
        assert self.output in ("shards", "adapter", "norms"), self.output
        assert self.files in ("local", "overlapped", "low_disk"), self.files


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: λ per norm group, the ledger of norms and Gram matrices, the counters."""

    #: per norm group, one coefficient per fine-tune
    coefficients: Mapping[str, list[float]]
    ledger: NormLedger
    stats: StreamStats
    #: what the weighted sums accumulated in (float64 for the fused and low-rank kernels)
    precision: str
    #: retained share of ‖B·A‖² per module of an adapter cut to a rank (None: no cut)
    energy: Mapping[str, float] | None = None
    #: where the loop's time went (`timeline`)
    times: LoopTimes = LoopTimes()


class Coefficients:
    """The kernels' view of the ledger while merging (`merging.Coefficients`): a group's λ (computed
    once, from its norms when the method uses them), and the norms of a one-tensor group that the
    method path reduced from the τ it formed."""

    def __init__(self, ledger: NormLedger, kernel: MergeKernel) -> None:
        self.ledger = ledger
        self.method = kernel.ctx.method
        self.n_models = len(kernel.ctx.plan.models)
        self.known: dict[str, list[float]] = {}

    def __call__(self, group: str) -> list[float]:
        if group not in self.known:
            sq = self.ledger.sq(group) if self.method.uses_group_norms else None
            self.known[group] = self.method.coefficients(sq, self.n_models)
        return self.known[group]

    def pending(self, group: str) -> bool:
        return not self.ledger.is_complete(group)

    def settle(self, record: Record) -> None:
        """A one-tensor norm group reduced from the τ the method path formed: reduce and apply at once."""
        self.ledger.add_records([record])
        self.ledger.finish([record[0]])


class Executor:
    """Runs a `MergePlan` with a kernel, a feed and a sink; see the module docstring.

    Args:
        plan: the merge plan.
        kernel: how tensors become norms and merged tensors (`merging.build_kernel`).
        feed: how pieces are read (`feed.PieceFeed`).
        sink: where merged tensors go (`writer.ShardSink`, `adapter_output.AdapterSink`, `sinks.NoOutput`).
        ledger: squared norms known so far (a resumed run's, or empty); the run adds the rest.
        share: this process's part of a multi-process merge (`distributed`); None: all of it.
        progress: show progress bars.
    """

    def __init__(self, plan: "MergePlan", kernel: MergeKernel, feed: Feed, sink: Sink, *, ledger: NormLedger,
                 share: "Share | None" = None, progress: bool = True) -> None:
        self.plan = plan
        self.kernel = kernel
        self.method = kernel.ctx.method
        self.feed = feed
        self.sink = sink
        self.ledger = ledger
        self.share = share
        self.progress = progress
        self.stats = StreamStats()
        self.coefs = Coefficients(ledger, kernel)
        self._stopped = False
        # The main thread's loop, split (`timeline.LoopTimes`): seconds waiting for the feed, in
        # the kernel, held by the sink; the loop's clocks.
        self._waits = {"feed_wait": 0.0, "kernel": 0.0, "sink_wait": 0.0}
        self._clock: dict[str, float] = {}
        self._queued: dict[int, float] | None = None  # run-queue seconds of each thread in the loop
        # The same readings as spans (`trace`): what the main thread did when, by step.
        self._spans: list[Span] = []
        self._step = -1  # the step the feed last handed over, counted over both passes
        self._tid = threading.get_native_id()

    # ------------------------------------------------------------------ threads: one owner, one way out
    def run(self) -> RunResult:
        """Merge (or, with a sink that writes nothing, reduce norms only), reusing what an earlier run left."""
        threads = torch.get_num_threads()
        if self.kernel.one_torch_thread:
            torch.set_num_threads(1)
        self.feed.start()
        self.kernel.ctx.workers.start()
        self.sink.open()
        try:
            self._run()
        except BaseException:
            self._stop(cancel=True)
            raise
        finally:
            self._stop(cancel=False)
            torch.set_num_threads(threads)
        counts = self.feed.counts
        self.stats.device = str(self.kernel.ctx.device)
        self.stats.workers = self.kernel.ctx.workers.count
        self.stats.readers = self.feed.readers
        if self.kernel.stager is not None:
            self.stats.staging = self.kernel.stager.counts()
        if self.share is None:  # a shared run's counters were gathered from every process
            self.stats.bytes_read = counts.bytes_read
            self.stats.bytes_written = self.sink.bytes_written
        self.stats.pieces_read = counts.pieces_read
        self.stats.largest_read = counts.largest_read
        return RunResult(dict(self.coefs.known) if self.sink.writes else {}, self.ledger, self.stats,
                         self.kernel.precision, self.sink.energy, self._times())

    def _times(self) -> LoopTimes:
        """The loop's account, once every thread has stopped."""
        clock, queued = self._clock, self._queued
        spans, names = list(self._spans), {self._tid: threading.current_thread().name}
        for name, meter in (("read", self.feed.busy), ("job", self.kernel.ctx.workers.busy), ("write", self.sink.busy),
                            ("sync", self.sink.sync)):
            spans += meter.spans(name)
            names = {**meter.names, **names}
        return LoopTimes(start=clock["start"], end=clock["end"], cpu_start=clock["cpu_start"],
                         cpu_end=clock["cpu_end"], main_cpu=clock["main_cpu"], **self._waits,
                         main_queued=queued.get(threading.get_native_id(), 0.0) if queued is not None else None,
                         readers=self.feed.busy.busy(queued), workers=self.kernel.ctx.workers.busy.busy(queued),
                         writer=self.sink.busy.busy(queued), writer_sync=self.sink.sync.busy(),
                         spans=tuple(spans), main_tid=self._tid, thread_names=names)

    def _stop(self, *, cancel: bool) -> None:
        """The feed first (a read waiting on a download then fails at once), then compute workers
        and the sink. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.feed.stop(cancel=cancel)
        self.kernel.ctx.workers.stop(cancel=cancel)
        if cancel:
            self.sink.abort()

    # ------------------------------------------------------------------ the run
    def plan_steps(self) -> Schedule:
        """This run's schedule, from the plan, the ledger and the finished shards (no I/O but the resume check)."""
        done = self.sink.finished()
        self.stats.shards_reused = len(done)
        share = self.share
        return schedule(self.plan, self.feed.pieces(slabs=self.kernel.slabs), uses_norms=self.method.uses_group_norms,
                        fused=self.kernel.fused, known=frozenset(self.ledger.complete), done=frozenset(done),
                        owners=share.owners if share is not None else None,
                        process=share.index if share is not None else 0, reverse_pass_2=not self.feed.sequential)

    def _run(self) -> None:
        queued = run_queue()
        self._tid = threading.get_native_id()
        start = time.perf_counter()
        self._clock.update(start=start, cpu_start=time.process_time(), main_cpu=time.thread_time())
        try:
            self._steps(start)
        finally:
            end = self._clock["end"] = time.perf_counter()
            self._clock.update(cpu_end=time.process_time(), main_cpu=time.thread_time() - self._clock["main_cpu"])
            self.stats.seconds = end - start
            # read while every thread of the run still exists (`_stop` ends them)
            later = run_queue()
            if queued is not None and later is not None:
                self._queued = {t: w - queued.get(t, 0.0) for t, w in later.items()}

    def _steps(self, start: float) -> None:
        steps = self.plan_steps()
        self.feed.prepare(steps)
        if not self.sink.writes:  # norms only (`inspect`): pass 1 alone
            if steps.passes != 2:
                raise ValueError("a run that writes nothing needs a two-pass plan (granularity model) and no known norms")
            self.stats.passes = 1
            self._reduce_pass(steps.reduce_pass)
            return
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
            counts = self.feed.counts
            self.stats.bytes_read, self.stats.bytes_written = counts.bytes_read, self.sink.bytes_written
            self.share.share_results(self.ledger, self.stats)
            self.coefs.known.clear()
        wanted = [g for g in self.plan.norm_groups if not self.method.uses_group_norms or self.ledger.is_complete(g)]
        self.coefs.known = {g: self.coefs(g) for g in wanted}  # in plan order

    def _reduce_pass(self, steps: Sequence[Step]) -> None:
        """Pass 1 of a whole-model λ: every norm group's squared norms (split over processes when shared)."""
        # Adapters' exact norms need no base weights (the method kernel reads them lazily if it must).
        with_base = self.kernel.pass1_reads_base
        walk = self._timed(self.feed.walk(steps, "pass 1/2: norms", lambda s: with_base, self.progress))
        if self.share is None:
            for step, raws in walk:
                self.ledger.add_records(self._reduce(step, raws))
        else:
            # Each process reduces the groups it leads, recording every tensor's squared norms; all
            # records are gathered and every process adds them in plan order, so the float64 sums
            # are the ones a single process makes, bit for bit.
            mine = {step.order: self._reduce(step, raws) for step, raws in walk}
            records: dict[int, list] = {}
            for part in self.share.gather(mine):
                records.update(part)
            for k in sorted(records):
                self.ledger.add_records(records[k])
        self.ledger.finish_all()

    def _merge_pass(self, steps: Sequence[Step]) -> None:
        """Merge every piece and hand its tensors to the sink (finished shards are skipped)."""
        label = "pass 2/2: merge" if self.stats.passes == 2 else "merge"
        norms = self.method.uses_group_norms
        kernel = self.kernel

        def with_base(step: Step) -> bool:
            return kernel.merge_reads_base if step.merge else kernel.reduce_reads_base

        waits, spans, tid = self._waits, self._spans, self._tid
        clock = time.perf_counter
        for step, raws in self._timed(self.feed.walk(steps, label, with_base, self.progress)):
            if step.reduce:
                self.ledger.add_records(self._reduce(step, raws))
                self.ledger.finish(step.finishes)
            if not step.merge:
                continue
            t0 = clock()
            alloc = self.sink.alloc(step)  # waits for the writes of this memory's last use
            t1 = clock()
            outs = kernel.merge(step.write, raws, step.piece, self.coefs, alloc)
            t2 = clock()
            self.sink.write(step, outs, self.ledger.state() if norms else None)
            t3 = clock()
            waits["sink_wait"] += t3 - t2 + t1 - t0
            waits["kernel"] += t2 - t1
            n = self._step
            spans += (Span("sink_wait", tid, t0, t1, n), Span("merge", tid, t1, t2, n), Span("sink_wait", tid, t2, t3, n))
        t0 = clock()
        self.sink.finish(self.ledger.state() if norms else None)
        t1 = clock()
        waits["sink_wait"] += t1 - t0
        spans.append(Span("sink_wait", tid, t0, t1, self._step))

    def _timed(self, walk: Iterator[tuple[Step, list]]) -> Iterator[tuple[Step, list]]:
        """The feed's walk, adding the main thread's wait for each next piece to `feed_wait`."""
        waits, spans, tid = self._waits, self._spans, self._tid
        while True:
            t = time.perf_counter()
            try:
                item = next(walk)
            except StopIteration:
                end = time.perf_counter()
                waits["feed_wait"] += end - t
                spans.append(Span("feed_wait", tid, t, end, self._step))
                return
            end = time.perf_counter()
            waits["feed_wait"] += end - t
            self._step += 1
            spans.append(Span("feed_wait", tid, t, end, self._step))
            yield item

    def _reduce(self, step: Step, raws: list) -> list:
        t = time.perf_counter()
        try:
            return self.kernel.reduce(step.reduce_tensors, raws, step.piece, lambda: self.feed.read_base(step.piece))
        finally:
            end = time.perf_counter()
            self._waits["kernel"] += end - t
            self._spans.append(Span("reduce", self._tid, t, end, self._step))
