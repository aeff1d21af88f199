"""When each thread worked (engine/trace.py): the spans a merge records, the concurrency summary
computed from them, and the Chrome trace `HF_METAGPT_TRACE` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from hf_metagpt.constants import TIMELINE_ENV, TRACE_ENV
from hf_metagpt.engine.merging import FusedKernel
from hf_metagpt.engine.trace import Span, busy_threads, concurrency, idle_stretches, main_during, trace_events
from hf_metagpt.engine.writer import ShardWriter
from helpers import merge_family

ROOT = Path(__file__).resolve().parents[2]
#: seconds each slowed job or write sleeps
DELAY = 0.03


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family(n_models=2)


def _events(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    assert set(d) == {"traceEvents", "displayTimeUnit", "otherData"}
    return d["traceEvents"]


def _spans(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["ph"] == "X" and e["name"] == name]


def test_slowed_jobs_and_writes_show_as_spans_of_their_length(family, tmp_path, monkeypatch):
    real_job, real_write = FusedKernel.run_job, ShardWriter.write
    slowed: dict[str, list] = {"job": [], "write": []}  # (thread, start, end) of each slowed call

    def slow(role, real):
        def call(*args, **kw):
            t = time.perf_counter()
            time.sleep(DELAY)
            out = real(*args, **kw)
            slowed[role].append((threading.get_native_id(), t, time.perf_counter()))
            return out
        return call

    monkeypatch.setattr(FusedKernel, "run_job", slow("job", real_job))
    monkeypatch.setattr(ShardWriter, "write", slow("write", real_write))
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace.json"))
    monkeypatch.setenv("HF_METAGPT_WORKERS", "2")
    result = merge_family(family, tmp_path / "out")
    lp = result.timeline.loop
    events = _events(tmp_path / "trace.json")
    jobs, writes = _spans(events, "job"), _spans(events, "write")
    assert len(jobs) == lp.workers.count > 10 and len(writes) == lp.writer.count == len(slowed["write"]) > 10
    # every slowed call (the merge's jobs, not pass 1's norms) lies inside a span of its role on its
    # thread that lasts its sleep at least; the spans' sum is the role's busy seconds
    for role, spans in (("job", jobs), ("write", writes)):
        assert len(slowed[role]) > 10
        for tid, t0, t1 in slowed[role]:
            a, b = (t0 - lp.start) * 1e6, (t1 - lp.start) * 1e6
            inside = [e for e in spans if e["tid"] == tid and e["ts"] <= a + 0.2 and e["ts"] + e["dur"] >= b - 0.2]
            assert len(inside) == 1 and inside[0]["dur"] >= DELAY * 1e6, (role, a, b)
    assert sum(e["dur"] for e in jobs) / 1e6 == pytest.approx(lp.workers.seconds, abs=1e-4 * len(jobs))
    assert sum(e["dur"] for e in writes) / 1e6 == pytest.approx(lp.writer.seconds, abs=1e-4 * len(writes))
    # inside the loop: ts from its start, nothing past its end
    assert min(e["ts"] for e in jobs + writes) >= 0
    assert max(e["ts"] + e["dur"] for e in jobs + writes) <= lp.seconds * 1e6 + 1
    # two workers sleeping side by side: on average more than one busy while the kernel waits for them
    c = result.timeline.as_dict()["concurrency"]
    assert c["workers"]["of"] == 2 and sum(c["workers"]["hist"]) == pytest.approx(1.0, abs=0.01)
    busy = sum(e["dur"] for e in jobs) / 1e6 / lp.seconds
    assert c["workers"]["mean"] == pytest.approx(busy, abs=0.01)  # no thread counted twice
    assert c["writer"]["mean"] == pytest.approx(lp.writer.seconds / lp.seconds, abs=0.01)


def test_the_trace_has_the_timelines_counts_and_one_threads_spans_never_overlap(family, tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "t" / "trace.json"))  # its folder made
    result = merge_family(family, tmp_path / "out")
    lp = result.timeline.loop
    events = _events(tmp_path / "t" / "trace.json")
    counts = Counter(e["name"] for e in events if e["ph"] == "X")
    assert (counts["read"], counts["job"], counts["write"], counts["sync"]) == (
        lp.readers.count, lp.workers.count, lp.writer.count, lp.writer_sync.count)
    steps = _spans(events, "feed_wait")
    merges = _spans(events, "merge")
    assert len(merges) == len({e["args"]["step"] for e in merges}) > 0  # one kernel call per merge step
    assert sum(e["dur"] for e in steps) / 1e6 == pytest.approx(lp.feed_wait, abs=1e-4 * len(steps))
    names = [e for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert names[0]["args"]["name"] == "MainThread"  # first
    # every thread named, also the writer's, whose pool ends inside the loop (the last writes)
    named = {e["tid"]: e["args"]["name"] for e in names}
    assert {named[e["tid"]].rstrip("_0123456789") for e in _spans(events, "write")} == {"hf-metagpt-write"}
    assert all(named[e["tid"]] == "MainThread" or named[e["tid"]].startswith("hf-metagpt-read")
               for e in _spans(events, "read"))
    by_thread: dict[tuple, list] = {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault(e["tid"], []).append(e)
    assert len(by_thread) >= 3  # main, a reader, the writer (and compute workers)
    for spans in by_thread.values():
        # one thread's spans nest or follow one another (a sync inside its write), never cross;
        # spans of one name never overlap at all (0.2 µs: the rounding of ts and dur)
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_: list[float] = []
        for e in spans:
            while open_ and open_[-1] <= e["ts"] + 0.2:
                open_.pop()
            assert not open_ or e["ts"] + e["dur"] <= open_[-1] + 0.2, e
            open_.append(e["ts"] + e["dur"])
        for name in {e["name"] for e in spans}:
            same = [e for e in spans if e["name"] == name]
            assert all(a["ts"] + a["dur"] <= b["ts"] + 0.2 for a, b in zip(same, same[1:])), name


def test_without_the_variable_no_trace_is_written(family, tmp_path, monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    result = merge_family(family, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not [p for p in (tmp_path / "out").rglob("*") if "trace" in p.name]
    # the summary is still there: it costs nothing but the spans already kept
    assert result.timeline.as_dict()["concurrency"]["workers"]["of"] == result.stats.workers


# --------------------------------------------------------------------------- the summary, by hand

def test_busy_threads_histogram_equals_a_hand_count():
    # loop 0..10; thread 1 busy 0-4 and 6-8 (a nested span 1-2 inside), thread 2 busy 3-7, thread 3 9-12 (clipped)
    spans = [Span("job", 1, 0, 4), Span("job", 1, 1, 2), Span("job", 1, 6, 8), Span("job", 2, 3, 7),
             Span("job", 3, 9, 12)]
    # 0 busy: 8-9 → 1 s; 1 busy: 0-3, 4-6, 7-8, 9-10 → 7 s; 2 busy: 3-4, 6-7 → 2 s; 3 busy: never
    assert busy_threads(spans, 0, 10, of=2) == [1.0, 7.0, 2.0, 0.0]
    assert busy_threads([], 0, 10, of=2) == [10.0, 0.0, 0.0]
    assert idle_stretches(spans, 0, 10) == [(8, 9)]
    c = concurrency(spans, 0, 10, {"workers": 2})
    assert c["workers"] == {"mean": 1.1, "of": 2, "hist": [0.1, 0.7, 0.2, 0.0]}
    assert c["readers"] == {"mean": 0.0, "of": 1, "hist": [1.0, 0.0]}


def test_stretches_without_a_worker_say_what_the_main_thread_did():
    main = [Span("feed_wait", 9, 0, 1, 0), Span("merge", 9, 1, 3, 0), Span("sink_wait", 9, 3, 3.5, 0),
            Span("feed_wait", 9, 4, 6, 1), Span("merge", 9, 6, 8, 1), Span("sink_wait", 9, 8, 10, 1)]
    jobs = [Span("job", 2, 1.5, 3), Span("job", 3, 6, 7.5)]
    assert main_during(main, 3, 6) == {"sink_wait": 0.5, "feed_wait": 2.0, "other": 0.5}
    c = concurrency(main + jobs, 0, 10, {"workers": 2}, main_tid=9)["no_worker"]
    # idle: 0-1.5 (feed 1, merge .5), 3-6 (sink .5, other .5, feed 2), 7.5-10 (merge .5, sink 2)
    assert c["seconds"] == 7.0 and c["stretches"] == 3
    assert c["main"] == {"feed_wait": 3.0, "sink_wait": 2.5, "merge": 1.0, "other": 0.5}
    assert [(x["at"], x["seconds"]) for x in c["longest"]] == [(3.0, 3.0), (7.5, 2.5), (0.0, 1.5)]
    assert c["longest"][1]["main"] == {"merge": 0.5, "sink_wait": 2.0}


# --------------------------------------------------------------------------- the CLI, in a fresh interpreter

def _cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (TIMELINE_ENV, TRACE_ENV)}
    full.update(env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=600)


def test_cli_writes_the_trace_and_v_says_how_busy_the_threads_were(family, tmp_path):
    base, fts = family
    trace, account = tmp_path / "trace.json", tmp_path / "timeline.json"
    proc = _cli("-v", "merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "out"), cwd=tmp_path,
                env={TRACE_ENV: str(trace), TIMELINE_ENV: str(account)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(trace)
    tl = json.loads(account.read_text())
    counts = Counter(e["name"] for e in events if e["ph"] == "X")
    assert (counts["read"], counts["job"], counts["write"]) == tuple(
        tl["busy"][k]["count"] for k in ("readers", "workers", "writer"))
    assert {e["pid"] for e in events} == {events[0]["pid"]} and events[0]["args"] == {"name": "hf-metagpt merge"}
    assert json.loads(trace.read_text())["otherData"]["concurrency"] == tl["concurrency"]
    w = tl["concurrency"]["workers"]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("where the time went: ")
    assert f"threads busy on average: readers {tl['concurrency']['readers']['mean']:.1f} of " in line
    assert f"workers {w['mean']:.1f} of {w['of']}" in line and "no worker busy " in line
    # without the variable: no trace, the same bytes
    proc = _cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "plain"), cwd=tmp_path, env={})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain", "timeline.json", "trace.json"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")} == {
        p.name: p.read_bytes() for p in (tmp_path / "plain").glob("*.safetensors")}


def test_trace_events_keep_nested_spans_nested_after_rounding():
    import random

    rng = random.Random(0)
    spans = []
    for i in range(2000):  # a parent and a child inside it, ends a fraction of the rounding apart
        s = rng.uniform(0, 1e-3)
        e = s + rng.uniform(0, 1e-6)
        cs = rng.uniform(s, e)
        spans += [Span("merge", i, s, e), Span("job", i, cs, rng.uniform(cs, e))]
    events = [e for e in trace_events(spans, 0.0, {}, 1) if e["ph"] == "X"]
    assert len(events) == 4000 and events[0]["pid"] == 1
    by_tid = {}
    for ev in events:
        by_tid.setdefault(ev["tid"], []).append(ev)
    for parent, child in by_tid.values():  # the parent first (sorted by start, the longer first)
        assert (parent["name"], child["name"]) == ("merge", "job")
        assert parent["ts"] <= child["ts"] and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + 1e-6
