"""When each thread worked: the loop's spans, how many threads of a role were busy at once, and a
Chrome/Perfetto trace of them (`HF_METAGPT_TRACE=FILE`).

The spans come for free from the clocks the time account reads already (`timeline.Meter` keeps the
start and the thread of each piece of work; the executor its own waits per step). From them:

- `concurrency`: per role, the share of the loop with k of its threads busy, the mean busy
  threads, and the stretches where no compute worker was busy — with what the main thread did
  meanwhile (waiting for reads, for the writer, in the kernel, or something else);
- `trace_events`: the spans as Chrome trace events (complete events, microseconds from the loop's
  start), which https://ui.perfetto.dev and chrome://tracing open (docs/hardware.md, "A trace of a run").
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

#: span names of each role's threads (a `Meter`'s pieces of work)
ROLE_SPANS = {"readers": "read", "workers": "job", "writer": "write"}
#: the main thread's spans, per step (`executor`)
MAIN_SPANS = ("feed_wait", "reduce", "merge", "sink_wait")
#: stretches without a busy compute worker listed in `concurrency` (the longest first)
LONGEST = 5


class Span(NamedTuple):
    """One piece of work of one thread: `start`/`end` are `time.perf_counter()` readings."""

    name: str
    tid: int
    start: float
    end: float
    #: the step of the loop it belongs to (the main thread's spans; -1: not known)
    step: int = -1


def _union(spans: Iterable[Span], start: float, end: float) -> list[tuple[float, float]]:
    """The spans' time clipped to [start, end], overlaps merged, in order."""
    out: list[tuple[float, float]] = []
    for s, e in sorted((max(sp.start, start), min(sp.end, end)) for sp in spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def busy_threads(spans: Sequence[Span], start: float, end: float, of: int = 1) -> list[float]:
    """Seconds of [start, end] with exactly k threads busy, k = 0 .. max(of, threads seen).

    A thread counts once however its spans nest (a shard's sync inside its write).
    """
    by_thread: dict[int, list[Span]] = {}
    for sp in spans:
        by_thread.setdefault(sp.tid, []).append(sp)
    edges = sorted((x, d) for tid_spans in by_thread.values() for s, e in _union(tid_spans, start, end)
                   for x, d in ((s, 1), (e, -1)))
    hist = [0.0] * (max(of, len(by_thread)) + 1)
    k, t = 0, start
    for x, d in edges:
        hist[k] += x - t
        t, k = x, k + d
    hist[k] += max(end - t, 0.0)
    return hist


def idle_stretches(spans: Sequence[Span], start: float, end: float) -> list[tuple[float, float]]:
    """The stretches of [start, end] no span covers, in order."""
    out, t = [], start
    for s, e in _union(spans, start, end):
        if s > t:
            out.append((t, s))
        t = max(t, e)
    if end > t:
        out.append((t, end))
    return out


def main_during(main: Sequence[Span], s: float, e: float) -> dict[str, float]:
    """Seconds of [s, e] the main thread spent in each of its spans (sorted by start, never
    overlapping), the rest as "other"."""
    starts = [sp.start for sp in main]
    out: dict[str, float] = {}
    for sp in main[max(bisect_right(starts, s) - 1, 0):]:
        if sp.start >= e:
            break
        both = min(sp.end, e) - max(sp.start, s)
        if both > 0:
            out[sp.name] = out.get(sp.name, 0.0) + both
    out["other"] = max((e - s) - sum(out.values()), 0.0)
    return out


def concurrency(spans: Sequence[Span], start: float, end: float, threads: dict[str, int],
                main_tid: int | None = None) -> dict[str, Any]:
    """Per role (`ROLE_SPANS`): `hist` (share of the loop with k of its threads busy), `mean` busy
    threads and `of` (its threads); `no_worker`: seconds no compute worker was busy, what the main
    thread did meanwhile, and the `LONGEST` such stretches (`at`: seconds from the loop's start)."""
    total = end - start
    out: dict[str, Any] = {}
    if total <= 0:
        return out
    for role, name in ROLE_SPANS.items():
        hist = busy_threads([sp for sp in spans if sp.name == name], start, end, threads.get(role, 1))
        out[role] = {"mean": _r(sum(k * h for k, h in enumerate(hist)) / total), "of": threads.get(role, 1),
                     "hist": [_r(h / total) for h in hist]}
    main = sorted((sp for sp in spans if sp.name in MAIN_SPANS and (main_tid is None or sp.tid == main_tid)),
                  key=lambda sp: sp.start)
    gaps = idle_stretches([sp for sp in spans if sp.name == "job"], start, end)
    doing: dict[str, float] = {}
    for s, e in gaps:
        for k, v in main_during(main, s, e).items():
            doing[k] = doing.get(k, 0.0) + v
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:LONGEST]
    out["no_worker"] = {
        "seconds": _r(sum(e - s for s, e in gaps)), "stretches": len(gaps),
        "main": {k: _r(v) for k, v in sorted(doing.items(), key=lambda kv: -kv[1])},
        "longest": [{"at": _r(s - start), "seconds": _r(e - s),
                     "main": {k: _r(v) for k, v in main_during(main, s, e).items() if v >= 5e-4}} for s, e in longest]}
    return out


def concurrency_line(c: dict[str, Any]) -> str:
    """The `-v` line's part: mean busy threads per role, and the seconds without a busy worker."""
    if not c:
        return ""
    roles = ", ".join(f"{role} {c[role]['mean']:.1f} of {c[role]['of']}" for role in ROLE_SPANS)
    idle = c["no_worker"]
    main = ", ".join(f"{k} {v:.1f}" for k, v in idle["main"].items() if v >= 0.05)
    return f"; threads busy on average: {roles}; no worker busy {idle['seconds']:.1f} s" + (f" ({main})" if main else "")


def trace_events(spans: Sequence[Span], start: float, names: dict[int, str], pid: int,
                 main_tid: int | None = None) -> list[dict[str, Any]]:
    """Chrome trace events: one complete event ("X") per span, `ts`/`dur` in µs from `start`, and
    the threads' names as metadata ("M"), the main thread first."""
    tids = sorted({sp.tid for sp in spans}, key=lambda t: (t != main_tid, t))
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                                     "args": {"name": "hf-metagpt merge"}}]
    for i, tid in enumerate(tids):
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                       "args": {"name": names.get(tid, f"thread {tid}")}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": i}})
    for sp in sorted(spans, key=lambda sp: (sp.start, -sp.end)):
        # both ends rounded, so a span inside another stays inside it (the viewers need proper nesting)
        ts, te = round((sp.start - start) * 1e6, 1), round((sp.end - start) * 1e6, 1)
        ev = {"name": sp.name, "ph": "X", "ts": ts, "dur": round(te - ts, 1), "pid": pid, "tid": sp.tid}
        if sp.step >= 0:
            ev["args"] = {"step": sp.step}
        events.append(ev)
    return events


def write_trace(path: str | os.PathLike, events: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """The trace-event JSON (`{"traceEvents": [...]}`, the concurrency summary under "otherData"),
    compact; its folder is created when missing. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": summary},
                               separators=(",", ":")) + "\n")
    return path


def _r(x: float) -> float:
    return round(x, 3)
