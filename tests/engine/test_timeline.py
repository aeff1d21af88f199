"""The time account of a merge (engine/timeline.py): each role's busy seconds, the main thread's
waits and the process's phases, checked against delays the tests put into one role at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_metagpt.constants import TIMELINE_ENV
from hf_metagpt.engine import feed as feed_module
from hf_metagpt.engine.merging import FusedKernel
from hf_metagpt.engine.timeline import Busy, LoopTimes, Meter, Timeline, process_age, run_queue
from hf_metagpt.engine.writer import ShardWriter
from helpers import merge_family

ROOT = Path(__file__).resolve().parents[2]
#: seconds each slowed read, job or write sleeps (a sleep is wall time, not CPU time)
DELAY = 0.03
#: clock slack of one measurement (perf_counter differences of a busy 2-core machine)
SLACK = 0.05


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family(n_models=2)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_slow_writer_shows_as_writer_busy_and_main_thread_sink_wait(family, tmp_path, monkeypatch):
    plain = merge_family(family, tmp_path / "plain")
    writes = []
    real = ShardWriter.write

    def slow(self, name, tensor, *, part=False):
        time.sleep(DELAY)
        writes.append(name)
        return real(self, name, tensor, part=part)

    monkeypatch.setattr(ShardWriter, "write", slow)
    result = merge_family(family, tmp_path / "slow")
    lp = result.timeline.loop
    slept = DELAY * len(writes)
    assert len(writes) == lp.writer.count > 10
    assert lp.writer.seconds >= slept
    assert lp.writer.seconds - lp.writer.cpu >= 0.9 * slept  # sleeping is not CPU time
    # The writer's work lies inside the loop: whatever the main thread did not spend elsewhere
    # while the writer slept, it spent waiting for it.
    others = lp.feed_wait + lp.kernel + lp.other
    assert lp.sink_wait >= slept - others - SLACK
    assert lp.sink_wait >= 0.5 * slept
    assert lp.sink_wait > 3 * _plain_wait(plain)
    assert _shards(tmp_path / "slow") == _shards(tmp_path / "plain")  # the account changes no byte


def _plain_wait(result) -> float:
    return max(result.timeline.loop.sink_wait, 0.01)


def test_slow_reads_show_as_reader_busy_and_main_thread_feed_wait(family, tmp_path, monkeypatch):
    reads = []
    real = feed_module.read_metas

    def slow(*args, **kw):
        time.sleep(DELAY)
        reads.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(feed_module, "read_metas", slow)
    lp = merge_family(family, tmp_path / "out").timeline.loop
    slept = DELAY * len(reads)
    assert len(reads) == lp.readers.count > 10
    assert lp.readers.seconds >= slept and lp.readers.seconds - lp.readers.cpu >= 0.9 * slept
    # one reader thread, one piece ahead: the main thread waits for all but what it overlaps
    assert lp.feed_wait >= slept - (lp.kernel + lp.sink_wait + lp.other) - SLACK
    assert lp.feed_wait >= 0.5 * slept


def test_slow_jobs_show_as_worker_busy_inside_the_main_threads_kernel_time(family, tmp_path, monkeypatch):
    jobs = []
    real = FusedKernel.run_job

    def slow(self, j):
        time.sleep(DELAY)
        jobs.append(1)
        return real(self, j)

    monkeypatch.setattr(FusedKernel, "run_job", slow)
    result = merge_family(family, tmp_path / "out")
    lp, workers = result.timeline.loop, result.timeline.threads["workers"]
    slept = DELAY * len(jobs)
    assert lp.workers.count >= len(jobs) > 10  # (and the norms' jobs of pass 1)
    assert lp.workers.seconds >= slept and lp.workers.seconds - lp.workers.cpu >= 0.9 * slept
    # the main thread waits in the kernel while the workers share the jobs
    assert lp.kernel >= slept / workers - SLACK
    if sys.platform == "linux":  # sleeping threads do not wait for a core
        assert lp.workers.queued is not None and 0 <= lp.workers.queued < lp.workers.seconds - slept + SLACK


def test_the_main_threads_parts_and_the_phases_add_up(family, tmp_path):
    t = time.perf_counter()
    result = merge_family(family, tmp_path / "out")
    called = time.perf_counter() - t
    tl = result.timeline
    lp = tl.loop
    assert lp.seconds == pytest.approx(result.stats.seconds)  # the summary's "time X s"
    for part in (lp.feed_wait, lp.kernel, lp.sink_wait):
        assert 0 <= part <= lp.seconds
    assert lp.other >= -1e-6
    assert lp.feed_wait + lp.kernel + lp.sink_wait + lp.other == pytest.approx(lp.seconds)
    # prepare + loop + finish is merge()'s own duration
    assert tl.prepare > 0 and tl.finish > 0
    assert tl.prepare + lp.seconds + tl.finish == pytest.approx(called, abs=SLACK)
    assert sum(tl.finish_parts.values()) == pytest.approx(tl.finish, abs=1e-6)
    assert tl.finish_parts["publish"] > 0  # the card, side files, the swap into place
    # startup: since this interpreter started, before merge() was called
    age, how = process_age()
    assert how in ("proc", "psutil")
    assert tl.startup is not None and 0 < tl.startup < age
    assert tl.wall == pytest.approx(tl.startup + called, abs=SLACK)
    assert tl.threads == {"readers": result.stats.readers, "workers": result.stats.workers, "writers": 1}
    assert (tl.bytes_read, tl.bytes_written) == (result.stats.bytes_read, result.stats.bytes_written)
    assert tl.bytes_written == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))


def test_process_age_is_the_interpreters_age():
    age, how = process_age()
    assert how == "proc" or sys.platform != "linux"
    code = "import time; from hf_metagpt.engine.timeline import process_age; time.sleep(0.5); print(process_age()[0])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = float(proc.stdout)
    assert 0.5 <= child < 10, child


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux schedstat")
def test_run_queue_sees_threads_waiting_for_a_core():
    """Twice as many threads hashing (the GIL released) as cores: together they wait for a core."""
    import hashlib
    import threading

    n = 2 * (os.cpu_count() or 1)
    data = bytes(4 << 20)
    tids: list[int] = []
    start, done, leave = threading.Barrier(n + 1), threading.Barrier(n + 1), threading.Event()

    def spin() -> None:
        tids.append(threading.get_native_id())
        start.wait()
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            hashlib.sha256(data).digest()
        done.wait()
        leave.wait()  # alive (and idle) until the main thread has read the counters

    threads = [threading.Thread(target=spin) for _ in range(n)]
    for t in threads:
        t.start()
    start.wait()
    before = run_queue()
    done.wait()
    after = run_queue()
    leave.set()
    for t in threads:
        t.join()
    assert before is not None and after is not None and set(tids) <= set(after)
    waited = sum(after[t] - before.get(t, 0.0) for t in tids)
    # n threads × 0.5 s on half as many cores: about n × 0.25 s spent waiting (more on a busy machine)
    assert waited > 0.1 * n * 0.5, waited
    assert threading.get_native_id() in after


def test_meter_sums_from_many_threads():
    from concurrent.futures import ThreadPoolExecutor

    m = Meter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: [m.add(0.5, 0.25) for _ in range(1000)], range(8)))
    assert m.busy() == Busy(seconds=4000.0, cpu=2000.0, count=8000)
    assert 1 <= len(m.threads) <= 8  # the pool's threads that recorded
    assert m.busy({t: 1.5 for t in m.threads}).queued == 1.5 * len(m.threads)


def test_as_dict_rounds_seconds_and_has_every_documented_key():
    lp = LoopTimes(start=10.0, end=12.0, cpu_start=1.0, cpu_end=3.5, feed_wait=0.5, kernel=1.0, sink_wait=0.25,
                   main_cpu=1.2, readers=Busy(0.123456, 0.1, 3), workers=Busy(2.0, 1.9, 8),
                   writer=Busy(0.4, 0.2, 5), writer_sync=Busy(0.1, 0.0, 1))
    tl = Timeline(startup=1.23456, prepare=0.5, loop=lp, finish=0.75, finish_parts={"publish": 0.75},
                  cpu={"loop": 2.5}, threads={"readers": 1, "workers": 2, "writers": 1}, bytes_read=10,
                  bytes_written=5, device="cpu", started_by="proc")
    d = tl.as_dict()
    assert d["phases"] == {"startup": 1.235, "prepare": 0.5, "loop": 2.0, "finish": 0.75}
    assert d["wall"] == 4.485
    assert d["main_thread"] == {"feed_wait": 0.5, "kernel": 1.0, "sink_wait": 0.25, "other": 0.25, "cpu": 1.2,
                                "queued": None}
    assert d["busy"]["readers"] == {"seconds": 0.123, "cpu": 0.1, "count": 3, "queued": None}
    assert d["bytes"] == {"read": 10, "written": 5}
    assert json.loads(json.dumps(d)) == d
    line = tl.line()
    assert line.startswith("where the time went: startup 1.2 + prepare 0.5 + loop 2.0 + finish 0.8 = 4.5 s")
    assert "(loop: 1.2 cores busy)" in line and "workers 2.0/1.9 ×2" in line


# --------------------------------------------------------------------------- the CLI, in a fresh interpreter

def _cli(*args: str, cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    full = {k: v for k, v in os.environ.items() if k != TIMELINE_ENV}
    full.update(env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=600)
    return proc, time.perf_counter() - t


def test_cli_writes_the_timeline_json_and_v_prints_the_line(family, tmp_path):
    base, fts = family
    target = tmp_path / "account" / "timeline.json"
    proc, wall = _cli("-v", "merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "out"),
                      cwd=tmp_path, env={TIMELINE_ENV: str(target)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(target.read_text())
    assert set(d) == {"format", "units", "wall", "phases", "finish_parts", "cpu", "main_thread", "busy", "threads",
                      "concurrency", "bytes", "device", "processes", "started_by"}
    assert set(d["concurrency"]) == {"readers", "workers", "writer", "no_worker"}
    assert set(d["phases"]) == {"startup", "prepare", "loop", "finish"}
    assert set(d["main_thread"]) == {"feed_wait", "kernel", "sink_wait", "other", "cpu", "queued"}
    assert d["main_thread"]["queued"] >= 0 and d["busy"]["workers"]["queued"] >= 0
    assert set(d["busy"]) == {"readers", "workers", "writer", "writer_sync"}
    assert d["started_by"] == "proc" and d["device"] == "cpu" and d["processes"] == 1
    # The process's phases add up to its life, but for exec and the interpreter's exit.
    assert sum(d["phases"].values()) == pytest.approx(d["wall"], abs=0.005)
    assert 0 < d["wall"] <= wall and wall - d["wall"] < 5.0
    assert d["phases"]["startup"] > 0.2  # the interpreter and torch's import, at least
    assert d["bytes"]["written"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    summary = proc.stdout.strip().splitlines()
    assert summary[-2].startswith("time ") and f"time {d['phases']['loop']:.1f} s" in summary[-2]
    assert summary[-1].startswith("where the time went: startup ")


def test_cli_without_the_variable_writes_no_account_and_prints_no_line(family, tmp_path):
    base, fts = family
    out = tmp_path / "out"
    proc, _ = _cli("merge", *map(str, fts), "--base", str(base), "-o", str(out), cwd=tmp_path, env={})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "where the time went" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("time ")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not [p for p in out.rglob("*") if "timeline" in p.name]
