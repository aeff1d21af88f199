"""Where a merge's time went: busy seconds per role, the main thread's waits, the process's phases.

The engine measures with a few `time.perf_counter()` / `time.thread_time()` calls per piece, per
compute job and per write (never per chunk), so the account costs nothing the merge would notice
and changes no byte it writes. Each role keeps a `Meter` (the feed's readers, the kernel's compute
workers, the sink's writer); the executor splits its own loop into the time it waited for the next
piece, spent in the kernel, and was held by the sink. `api.merge` adds the process's phases and
returns a `Timeline` (a value) on `MergeResult.timeline`; `HF_METAGPT_TIMELINE=FILE` writes it as
JSON, `-v` prints `Timeline.line()` after the summary. The same readings are kept as spans (when
each thread worked, `engine.trace`): the account's "concurrency" says how many threads of each role
were busy at once, and `HF_METAGPT_TRACE=FILE` writes them as a Chrome/Perfetto trace.

How to read it (docs/hardware.md, "Where the time goes"):

- a role's `seconds` are wall seconds inside its work, summed over its threads, and `cpu` the CPU
  seconds those threads used meanwhile: `seconds - cpu` is time a thread was inside the work but
  not running — waiting for the disk, for the GIL, or for a core;
- the main thread's `feed_wait` large: the readers are the bottleneck; `sink_wait` large: the
  writer is; `kernel` large with the workers' `seconds` near `kernel × workers`: compute is;
- phases: `startup` (process start → `merge()` called: the interpreter and imports), `prepare`
  (→ the loop starts: inputs, plan, checks, the executor), `loop` (the summary's "time X s"),
  `finish` (→ `merge()` returns: threads joined, the card and its pictures, publishing, a push).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .trace import Span, concurrency, concurrency_line, trace_events, write_trace

#: Version of the JSON layout `Timeline.as_dict` writes.
TIMELINE_FORMAT = 1


@dataclass(frozen=True)
class Busy:
    """One role's work, summed over its threads."""

    #: wall seconds inside the role's work
    seconds: float = 0.0
    #: CPU seconds of its threads meanwhile (`time.thread_time`)
    cpu: float = 0.0
    #: pieces of work: reads, compute jobs, writes, finished shards
    count: int = 0
    #: seconds its threads were ready to run but waited for a core, over the whole loop (Linux
    #: schedstat; None where the platform does not say)
    queued: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": _r(self.seconds), "cpu": _r(self.cpu), "count": self.count, "queued": _r(self.queued)}


class Meter:
    """Adds up (wall, CPU) seconds from any thread; read once the threads are done (`busy`).

    `list.append` and `set.add` are atomic under the GIL, so threads record without a lock. The
    meter also notes which threads recorded (their run-queue time is read at the loop's end), and
    each part's start and thread, so the parts are also spans (`spans`, `engine.trace`) at no
    extra clock reading.
    """

    __slots__ = ("_parts", "threads", "names")

    def __init__(self) -> None:
        # (wall, cpu, start perf_counter or None when not known, native thread id)
        self._parts: list[tuple[float, float, float | None, int]] = []
        self.threads: set[int] = set()  # native ids of the threads that recorded
        #: their names (a pool's threads may be gone when the trace is written)
        self.names: dict[int, str] = {}

    def add(self, wall: float, cpu: float) -> None:
        """A piece of work of this thread whose start is not known (no span)."""
        tid = threading.get_native_id()
        self._parts.append((wall, cpu, None, tid))
        self._seen(tid)

    def add_since(self, start: tuple[float, float]) -> None:
        """One piece of work of this thread, from `start` (`clocks()` when it began) to now."""
        wall, cpu = start
        tid = threading.get_native_id()
        self._parts.append((time.perf_counter() - wall, time.thread_time() - cpu, wall, tid))
        self._seen(tid)

    def _seen(self, tid: int) -> None:
        if tid not in self.threads:
            self.names[tid] = threading.current_thread().name
            self.threads.add(tid)

    def busy(self, queued: dict[int, float] | None = None) -> Busy:
        """The sums; `queued`: run-queue seconds by thread over the loop (`run_queue`), summed over this role's."""
        parts = list(self._parts)
        waited = sum(queued.get(t, 0.0) for t in self.threads) if queued is not None else None
        return Busy(sum(p[0] for p in parts), sum(p[1] for p in parts), len(parts), waited)

    def spans(self, name: str) -> list[Span]:
        """The parts whose start is known, as spans called `name`."""
        return [Span(name, tid, start, start + wall) for wall, _, start, tid in list(self._parts) if start is not None]


def clocks() -> tuple[float, float]:
    """(wall, this thread's CPU) now: the two readings a `Meter` entry is the difference of."""
    return time.perf_counter(), time.thread_time()


@dataclass(frozen=True)
class LoopTimes:
    """The executor's loop (`Executor.run`): the main thread's split and every role's busy time.

    `start`/`end` are `time.perf_counter()` readings, `cpu_start`/`cpu_end` the process's CPU
    seconds (`time.process_time`, every thread) at those moments.
    """

    start: float = 0.0
    end: float = 0.0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    #: main thread: waiting for the next piece from the feed (between one step and the next)
    feed_wait: float = 0.0
    #: main thread: inside the kernel (reduce and merge), waiting for its compute workers included
    kernel: float = 0.0
    #: main thread: held by the sink (its memory for the next piece, handing tensors over, the last writes)
    sink_wait: float = 0.0
    #: the main thread's CPU seconds in the loop
    main_cpu: float = 0.0
    #: the main thread's seconds waiting for a core in the loop (None: the platform does not say)
    main_queued: float | None = None
    readers: Busy = Busy()
    workers: Busy = Busy()
    #: every write of the writer thread, `writer_sync` included
    writer: Busy = Busy()
    #: finishing shards: fsync, the progress record, the rename into place
    writer_sync: Busy = Busy()
    #: when each thread worked (`engine.trace`): every role's parts and the main thread's waits per step
    spans: tuple[Span, ...] = ()
    #: the main thread's native id, and the names of the run's threads by native id
    main_tid: int = 0
    thread_names: dict[int, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def other(self) -> float:
        """Main thread, the rest: the schedule, the ledger, progress bars, the λ at the end."""
        return self.seconds - self.feed_wait - self.kernel - self.sink_wait

    def concurrency(self, threads: dict[str, int]) -> dict[str, Any]:
        """How many threads of each role were busy at once, and when no compute worker was (`engine.trace`)."""
        return concurrency(self.spans, self.start, self.end, threads, self.main_tid) if self.spans else {}


@dataclass(frozen=True)
class Timeline:
    """Where one merge's time went (see the module docstring); `as_dict` is the JSON written.

    Attributes:
        startup: process start → `merge()` called (None: the platform does not say when the process started).
        prepare: `merge()` called → the loop starts.
        loop: the executor's loop.
        finish: the loop's end → `merge()` returns.
        finish_parts: what `finish` holds, by name (threads joined, pictures waited for, publish, push).
        cpu: the process's CPU seconds per phase (every thread), same keys as the phases.
        threads: readers, compute workers, writers of the run.
        bytes_read, bytes_written: what the run read and wrote.
        device: where the arithmetic ran.
        processes: processes sharing the merge (the account is this process's).
        staging: GPU staging's counts (`engine.staging`: copied, hits, misses); empty when the run did not stage.
        started_by: how the process start was known ("proc", "psutil", or "" when it was not).
    """

    startup: float | None
    prepare: float
    loop: LoopTimes
    finish: float
    finish_parts: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float | None] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    device: str = ""
    processes: int = 1
    started_by: str = ""
    staging: dict[str, int] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        """Seconds from the process's start (or `merge()`'s call) to `merge()`'s return."""
        return (self.startup or 0.0) + self.prepare + self.loop.seconds + self.finish

    def as_dict(self) -> dict[str, Any]:
        """The account as JSON-ready values (seconds with 3 decimals)."""
        lp = self.loop
        return {
            "format": TIMELINE_FORMAT,
            "units": "seconds",
            "wall": _r(self.wall),
            "phases": {"startup": _r(self.startup), "prepare": _r(self.prepare), "loop": _r(lp.seconds),
                       "finish": _r(self.finish)},
            "finish_parts": {k: _r(v) for k, v in self.finish_parts.items()},
            "cpu": {k: _r(v) for k, v in self.cpu.items()},
            "main_thread": {"feed_wait": _r(lp.feed_wait), "kernel": _r(lp.kernel), "sink_wait": _r(lp.sink_wait),
                            "other": _r(lp.other), "cpu": _r(lp.main_cpu), "queued": _r(lp.main_queued)},
            "busy": {"readers": lp.readers.as_dict(), "workers": lp.workers.as_dict(), "writer": lp.writer.as_dict(),
                     "writer_sync": lp.writer_sync.as_dict()},
            "threads": dict(self.threads),
            "concurrency": lp.concurrency(self.threads),
            "bytes": {"read": self.bytes_read, "written": self.bytes_written},
            "device": self.device,
            "processes": self.processes,
            "started_by": self.started_by,
            **({"staging": dict(self.staging)} if self.staging else {}),
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write `as_dict()` to `path` (its folder created when missing); returns the path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def write_trace(self, path: str | os.PathLike) -> Path:
        """The loop's spans as a Chrome/Perfetto trace (`engine.trace`; `HF_METAGPT_TRACE`); returns the path."""
        lp = self.loop
        events = trace_events(lp.spans, lp.start, lp.thread_names, os.getpid(), lp.main_tid)
        return write_trace(path, events, {"loop_seconds": _r(lp.seconds), "threads": dict(self.threads),
                                          "concurrency": lp.concurrency(self.threads)})

    def line(self) -> str:
        """One line for the CLI's `-v`: phases, the main thread's split, each role's busy seconds."""
        lp = self.loop
        start = f"startup {self.startup:.1f} + " if self.startup is not None else ""
        loop_cpu = self.cpu.get("loop")
        cores = f" (loop: {loop_cpu / lp.seconds:.1f} cores busy)" if loop_cpu is not None and lp.seconds > 0 else ""

        def role(name: str, b: Busy, n: int) -> str:
            queued = f"/{b.queued:.1f}" if b.queued is not None else ""
            return f"{name} {b.seconds:.1f}/{b.cpu:.1f}{queued} ×{n}"

        return (f"where the time went: {start}prepare {self.prepare:.1f} + loop {lp.seconds:.1f} + "
                f"finish {self.finish:.1f} = {self.wall:.1f} s{cores}; main thread in the loop: waiting for reads "
                f"{lp.feed_wait:.1f}, kernel {lp.kernel:.1f}, waiting for the writer {lp.sink_wait:.1f}, "
                f"other {lp.other:.1f} s; busy (in work/cpu/waiting for a core, s × threads): "
                + ", ".join([role("readers", lp.readers, self.threads.get("readers", 1)),
                             role("workers", lp.workers, self.threads.get("workers", 1)),
                             role("writer", lp.writer, self.threads.get("writers", 1))])
                + f" (fsync+rename {lp.writer_sync.seconds:.1f})" + concurrency_line(lp.concurrency(self.threads)))


def run_queue() -> dict[int, float] | None:
    """Seconds each thread of this process has waited for a core since it started (Linux
    /proc/self/task/*/schedstat, its second field), or None where the platform does not say.

    Read at the loop's start and end (`Executor`), not per job: the difference says whether a
    role's time not on a CPU was spent waiting for a core (the machine is busy) or blocked (the
    disk, the GIL, another thread).
    """
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    out: dict[int, float] = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                out[int(tid)] = int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):  # a thread that just ended; no schedstat at all
            continue
    return out or None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def process_age() -> tuple[float | None, str]:
    """(seconds since this process started, how it was known), or (None, "") where nobody says.

    Linux: the start time in /proc/self/stat (clock ticks since boot) against `CLOCK_BOOTTIME`, the
    same clock, to 1/100 s. Elsewhere psutil's `create_time` against the wall clock.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after the command's name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), "proc"
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time(), "psutil"
    except Exception:  # noqa: BLE001 — no psutil, or a platform it cannot ask: no startup phase
        return None, ""
