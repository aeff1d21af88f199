"""Time hf-metagpt merges against the read+write floor (and mergekit), on one fixture, in one run.

A merge must read every input byte once and write its output once, so the floor is a cold read of
all inputs (`cat` after evicting them from the page cache) plus a buffered write of an output-sized
file (`dd` into a fresh file). Every merge is paired with a floor taken just before it, and what we
quote is the ratio ``merge / floor`` of each pair: the disk here is too uneven from hour to hour for
absolute seconds to mean much. See bench/README.md for the method.

    python bench/make_fixture.py           # once: bench/fixtures/llama-1.1b (4 x 2.2 GB)
    python bench/run.py                    # floor + hf-metagpt (layer and model granularity)
    python bench/run.py --mergekit --repeat 3

Always exits 0: this reports timings, it does not judge them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MERGEKIT_VENV = BENCH_DIR / ".venv-mergekit"
GNU_TIME = Path("/usr/bin/time")
# Same weight for each task vector: the plain average that MetaGPT's per-layer lambdas refine.
MERGEKIT_WEIGHT = 1 / 3
MERGEKIT_FLAGS = ["--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


@dataclass
class Run:
    """One timed command: wall seconds, peak RSS, CPU split, and whether it worked."""

    name: str
    wall_s: float
    peak_rss_bytes: int | None
    user_s: float | None
    sys_s: float | None
    ok: bool
    rss_source: str
    note: str = ""
    floor_s: float | None = None  # the read+write floor measured just before this run, for the ratio

    @property
    def ratio(self) -> float | None:
        return self.wall_s / self.floor_s if self.ok and self.floor_s else None


@dataclass
class Case:
    """A command to measure against the floor; ``pending`` when its tool cannot run yet."""

    name: str
    argv: list[str]
    output: Path
    runs: list[Run] = field(default_factory=list)
    pending: str = ""


# --------------------------------------------------------------------------- page cache


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(paths: list[Path]) -> None:
    """Drops these files' pages from the page cache (no root needed; dirty pages are synced first)."""
    os.sync()  # DONTNEED skips dirty pages: write them back so they can go too
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def clear_output(folder: Path) -> None:
    if folder.exists():
        evict([p for p in folder.rglob("*") if p.is_file()])
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- timing


def _poll_tree_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        total = 0
        try:
            for p in [proc] + proc.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak[0] = max(peak[0], total)
        stop.wait(0.05)


def timed(name: str, argv: list[str], stdout=subprocess.DEVNULL, timeout: float | None = None) -> Run:
    """Runs argv; wall from perf_counter, peak RSS from GNU time (%M) or psutil polling.

    `timeout`: seconds after which the command and its children are killed (a failed run whose note
    says so): one hung run must not take a lent machine's whole budget."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    use_gnu_time = GNU_TIME.exists()
    rss_file = None
    if use_gnu_time:
        rss_file = tempfile.NamedTemporaryFile("w+", suffix=".time", delete=False)
        argv = [str(GNU_TIME), "-o", rss_file.name, "-f", "%M %U %S"] + argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=log)
    peak = [0]
    stop = threading.Event()
    poller = None
    if not use_gnu_time:
        poller = threading.Thread(target=_poll_tree_rss, args=(psutil.Process(proc.pid), stop, peak))
        poller.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_tree(proc.pid)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    if poller:
        poller.join()
    log.seek(0)
    err_lines = [line for line in log.read().splitlines() if line.strip()]
    log.close()
    os.unlink(log.name)
    rss, user, system, source = (peak[0] or None), None, None, "psutil tree poll (50 ms)"
    if rss_file:
        fields = Path(rss_file.name).read_text().split()
        rss_file.close()
        os.unlink(rss_file.name)
        # GNU time writes "Command exited with non-zero status N" before the format line
        if len(fields) >= 3:
            rss, user, system = int(fields[-3]) * 1024, float(fields[-2]), float(fields[-1])
        source = "/usr/bin/time %M"
    note = "" if rc == 0 else f"exit {rc}: " + (err_lines[-1] if err_lines else "no message")
    if timed_out:
        note = f"timed out after {timeout:.0f} s (killed)"
    return Run(name, wall, rss, user, system, rc == 0 and not timed_out, source, note[:300])


def _kill_tree(pid: int) -> None:
    """Kill a process and every descendant (GNU time's child, a merge's launcher and its workers)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def read_floor(inputs: list[Path]) -> Run:
    """``cat`` of every input shard to /dev/null, after evicting them from the page cache."""
    evict(inputs)
    return timed("floor read", ["cat", *map(str, inputs)])


def write_floor(nbytes: int, folder: Path) -> Run:
    """A buffered ``dd`` of ``nbytes`` zeros into a fresh file in ``folder`` (then synced, evicted, removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "floor-write.bin"
    target.unlink(missing_ok=True)
    run = timed("floor write", ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={nbytes}",
                                "iflag=count_bytes", "status=none"])
    clear_output(folder)
    return run


@dataclass
class Floor:
    """One read+write floor: the cold read of every input, then the write of an output-sized file."""

    read: Run
    write: Run

    @property
    def wall_s(self) -> float:
        return self.read.wall_s + self.write.wall_s


def floor(inputs: list[Path], out_bytes: int, scratch: Path) -> Floor:
    return Floor(read_floor(inputs), write_floor(out_bytes, scratch))


def warm_up_memory(reserve: int = 1 << 30) -> float:
    """Touch every free page of RAM once (then give it back); returns the seconds it took.

    On a VM whose host backs guest memory only when it is first touched (and takes freed pages back
    lazily), the first writes into fresh page-cache pages cost up to ten times more than later ones
    (a 2.2 GB `dd` into a new file: 7 s the first time, 0.7 s after). Done once before the pairs, so
    neither the floor nor a merge pays for the machine's history.
    """
    import numpy as np

    free = psutil.virtual_memory().free
    t0 = time.perf_counter()
    blocks, left = [], max(0, free - reserve)
    while left > 0:
        n = min(left, 1 << 30)
        blocks.append(np.ones(n, dtype=np.uint8))
        left -= n
    del blocks
    return time.perf_counter() - t0


def measure(case: Case, inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[Run, Floor]:
    """A read+write floor, then the case itself on cold inputs; the pair gives one ratio."""
    clear_output(case.output)
    fl = floor(inputs, out_bytes, scratch)
    evict(inputs)
    run = timed(case.name, case.argv)
    run.floor_s = fl.wall_s
    if run.ok and not any(case.output.glob("*.safetensors")):
        run.ok, run.note = False, "exit 0 but no .safetensors in the output"
    os.sync()  # write-back of the output must not spill into the next measurement
    clear_output(case.output)
    return run, fl


# --------------------------------------------------------------------------- tools


def hf_metagpt_cases(models: list[Path], out_root: Path) -> list[Case]:
    exe = shutil.which("hf-metagpt")
    cases = []
    for gran, what in (("layer", "one pass"), ("model", "two passes, default")):
        out = out_root / f"hf-metagpt-{gran}"
        argv = [exe or "hf-metagpt", "-q", "merge", "--base", str(models[0]), *map(str, models[1:]),
                "--output", str(out), "--granularity", gran, "--overwrite"]
        cases.append(Case(f"hf-metagpt --granularity {gran} ({what})", argv, out,
                          pending="" if exe else "hf-metagpt is not installed"))
    return cases


def ensure_mergekit() -> tuple[Path | None, str]:
    """Returns (mergekit-yaml, version), building bench/.venv-mergekit the first time.

    mergekit is a peer we time, never a dependency: it lives in its own throw-away venv.
    torch goes in first, pinned, so that pip does not pull another build for mergekit.
    """
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    py = MERGEKIT_VENV / "bin" / "python"
    if not exe.exists():
        print(f"building {MERGEKIT_VENV.relative_to(REPO_DIR)} (once)...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
            pip = [str(py), "-m", "pip", "install", "-q"]
            subprocess.run(pip + ["torch==2.13.0"], check=True)
            subprocess.run(pip + ["mergekit"], check=True)
        except subprocess.CalledProcessError as e:
            return None, f"could not install mergekit: {e}"
    probe = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m, torch, mergekit;"
         "print(m.version('mergekit'), torch.__version__)"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        return None, "mergekit does not import: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return exe, probe.stdout.strip()


def mergekit_case(models: list[Path], out_root: Path, exe: Path | None, why: str) -> Case:
    cfg = out_root / "mergekit-task_arithmetic.yml"
    lines = ["merge_method: task_arithmetic", f"base_model: {models[0]}", "dtype: bfloat16", "models:"]
    for m in models[1:]:
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {MERGEKIT_WEIGHT:.6f}"]
    cfg.write_text("\n".join(lines) + "\n")
    out = out_root / "mergekit"
    argv = [str(exe), str(cfg), str(out), *MERGEKIT_FLAGS]
    return Case("mergekit task_arithmetic", argv, out, pending="" if exe else why)


# --------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = shutil.disk_usage(BENCH_DIR)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib_at_start": round(psutil.virtual_memory().available / 2**30, 1),
        "disk_total_gb": round(disk.total / 1e9),
        "disk_free_gb_at_start": round(disk.free / 1e9),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def git_rev() -> str:
    """HEAD, with -dirty when the working tree (the engine, typically) has uncommitted changes."""
    r = subprocess.run(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def _med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{unit}"


def _span(xs: list[float | None], spec: str) -> str:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return ""
    return f" ({min(xs):{spec}}–{max(xs):{spec}})"


def summarize(name: str, runs: list[Run], mk_wall: float | None, pending: str = "") -> dict:
    ok = [r for r in runs if r.ok]
    row = {"what": name, "n": len(ok), "pending": pending,
           "failures": [r.note for r in runs if not r.ok]}
    if ok:
        row |= {
            "wall_s": _med([r.wall_s for r in ok]),
            "wall_span": _span([r.wall_s for r in ok], ".1f"),
            "ratio_floor": _med([r.ratio for r in ok]),
            "ratio_span": _span([r.ratio for r in ok], ".2f"),
            "peak_rss_gb": _med([r.peak_rss_bytes / 1e9 if r.peak_rss_bytes else None for r in ok]),
            "user_s": _med([r.user_s for r in ok]),
            "sys_s": _med([r.sys_s for r in ok]),
        }
        row["speedup_mergekit"] = mk_wall / row["wall_s"] if mk_wall else None
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine"]
    out = [
        f"### {meta['fixture_desc']} — {meta['date']}",
        "",
        f"{m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['disk_total_gb']} GB disk "
        f"({m['disk_free_gb_at_start']} GB free); load at start {m['load_avg_at_start']}; "
        f"repeats: {meta['repeat']} (medians, span in brackets); commit {meta['git']}.",
        "",
        "| what | wall | ÷ floor | mergekit ÷ this | peak RSS | user / sys CPU |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["pending"] or not r["n"]:
            why = r["pending"] or ("failed: " + (r["failures"][0] if r["failures"] else "?"))
            out.append(f"| {r['what']}: **pending** | — | — | — | — | {why} |")
            continue
        out.append(
            f"| {r['what']} | {_fmt(r['wall_s'], '.1f', ' s')}{r['wall_span']} "
            f"| {_fmt(r.get('ratio_floor'), '.2f', '×')}{r.get('ratio_span', '')} "
            f"| {_fmt(r.get('speedup_mergekit'), '.2f', '×')} "
            f"| {_fmt(r.get('peak_rss_gb'), '.2f', ' GB')} "
            f"| {_fmt(r.get('user_s'), '.1f')} / {_fmt(r.get('sys_s'), '.1f')} s |"
        )
    out += ["", f"RSS: {meta['rss_source']}. ÷ floor: each run over the read+write floor measured just "
                f"before it (cold `cat` of the inputs, then a buffered `dd` of {meta['out_gb']:.2f} GB, the output's "
                f"size); medians of the pairs. mergekit ÷ this: mergekit's median wall over this row's. "
                f"Memory warm-up before the pairs: {meta['warm_up_s']:.1f} s. {meta['mergekit']}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", type=Path, default=None,
                   help="folder with base/ and task_*/ (default bench/fixtures/llama-SIZE; made if missing)")
    p.add_argument("--size", default="1.1b", help="fixture shape when --fixture is not given")
    p.add_argument("--mergekit", action="store_true", help="also time mergekit's task_arithmetic")
    p.add_argument("--repeat", type=int, default=1, help="runs of each case; medians are reported")
    p.add_argument("--only", choices=["layer", "model", "mergekit", "floor"], action="append",
                   help="restrict to these cases (repeatable)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where results go")
    args = p.parse_args(argv)

    fixture = args.fixture or BENCH_DIR / "fixtures" / f"llama-{args.size}"
    if not (fixture / "base").is_dir():
        if args.fixture:
            print(f"no base/ in {fixture}", file=sys.stderr)
            return 0
        sys.path.insert(0, str(BENCH_DIR))
        from make_fixture import make_fixture

        print(f"making fixture {fixture}...", flush=True)
        make_fixture(fixture, args.size)
    models = [fixture / "base"] + sorted(d for d in fixture.glob("task_*") if d.is_dir())
    inputs = [f for m in models for f in shard_files(m)]
    input_gb = sum(f.stat().st_size for f in inputs) / 1e9
    args.out.mkdir(parents=True, exist_ok=True)
    out_root = Path(tempfile.mkdtemp(prefix="merge-out-", dir=args.out))
    only = set(args.only or ["layer", "model", "mergekit", "floor"])

    cases = [c for c in hf_metagpt_cases(models, out_root)
             if c.name.split()[2] in only]
    mk_info = "mergekit not run (pass --mergekit)."
    mk_version = None
    if args.mergekit and "mergekit" in only:
        exe, ver = ensure_mergekit()
        mk_version = ver if exe else None
        cases.append(mergekit_case(models, out_root, exe, ver))
        mk_info = (f"mergekit {ver.split()[0]} (torch {ver.split()[1]}), flags {' '.join(MERGEKIT_FLAGS)}, "
                   f"weight {MERGEKIT_WEIGHT:.3f} per task." if exe else f"mergekit: {ver}")

    print(f"fixture: {fixture} — {len(models)} models, {len(inputs)} shards, {input_gb:.2f} GB", flush=True)
    # The output has the base's dtype and tensors: its size is the base's shards'.
    out_bytes = sum(f.stat().st_size for f in shard_files(models[0]))
    scratch = out_root / "floor"
    warm_s = warm_up_memory()
    first = floor(inputs, out_bytes, scratch)  # once, not counted: the first fresh-file write of the hour
    print(f"memory warm-up {warm_s:.1f} s; first floor (not counted) read {first.read.wall_s:.1f} s "
          f"+ write {first.write.wall_s:.1f} s", flush=True)
    floors: list[Floor] = []
    for i in range(args.repeat):
        if "floor" in only and not any(not c.pending for c in cases):
            fl = floor(inputs, out_bytes, scratch)
            floors.append(fl)
            print(f"[{i + 1}/{args.repeat}] floor read {fl.read.wall_s:.1f} s + write {fl.write.wall_s:.1f} s",
                  flush=True)
        for case in cases:
            if case.pending:
                continue
            run, fl = measure(case, inputs, out_bytes, scratch)
            floors.append(fl)
            case.runs.append(run)
            if not run.ok and case.name.startswith("hf-metagpt"):
                case.pending = run.note  # the engine is not ready: do not retry each repeat
            rss = _fmt(run.peak_rss_bytes / 1e9 if run.peak_rss_bytes else None, ".2f", " GB")
            print(f"[{i + 1}/{args.repeat}] {case.name}: {run.wall_s:.1f} s, {rss}, floor {fl.read.wall_s:.1f} "
                  f"+ {fl.write.wall_s:.1f} s, ratio {_fmt(run.ratio, '.2f', '×')} {run.note}", flush=True)
    shutil.rmtree(out_root, ignore_errors=True)

    mk = next((c for c in cases if c.name.startswith("mergekit")), None)
    mk_wall = _med([r.wall_s for r in mk.runs if r.ok]) if mk else None
    rows = []
    for name, runs in (("floor: cold read of all inputs (`cat`)", [f.read for f in floors]),
                       ("floor: buffered write of an output-sized file (`dd`)", [f.write for f in floors])):
        row = summarize(name, runs, None)
        row["ratio_floor"], row["ratio_span"], row["peak_rss_gb"] = None, "", None
        rows.append(row)
    total = [Run("floor", f.wall_s, None, None, None, True, "", floor_s=f.wall_s) for f in floors]
    row = summarize("floor: read + write (each ratio's denominator)", total, mk_wall)
    row["ratio_span"], row["peak_rss_gb"] = "", None
    rows.append(row)
    for c in cases:
        if c.runs and any(r.ok for r in c.runs):
            rows.append(summarize(c.name, c.runs, mk_wall if c is not mk else None))
        else:
            failed = [r.note for r in c.runs if not r.ok]
            rows.append(summarize(c.name.split(" (")[0], [], None,
                                  pending=c.pending or ("failed: " + failed[0] if failed else "not run")))
    if not any(c.name.startswith("hf-metagpt") for c in cases) and only & {"layer", "model"}:
        rows.append(summarize("hf-metagpt", [], None, pending="not run"))

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "fixture": fixture.name,
        "fixture_desc": f"{fixture.name}: base + {len(models) - 1} fine-tunes, {len(inputs)} shards, "
                        f"{input_gb:.2f} GB bf16",
        "input_bytes": int(input_gb * 1e9),
        "out_gb": out_bytes / 1e9,
        "warm_up_s": warm_s,
        "repeat": args.repeat,
        "git": git_rev(),
        "machine": machine(),
        "rss_source": "/usr/bin/time %M (max RSS of the child process)" if GNU_TIME.exists()
                      else "psutil, sum over the child's process tree, polled every 50 ms",
        "mergekit": mk_info,
        "mergekit_version": mk_version,
    }
    table = markdown(rows, meta)
    print()
    print(table)
    raw = {
        "meta": meta,
        "rows": rows,
        "floors": [{"read": asdict(f.read), "write": asdict(f.write), "total_s": f.wall_s} for f in floors],
        "cases": [{"name": c.name, "argv": [a.replace(str(REPO_DIR) + "/", "") for a in c.argv],
                   "pending": c.pending, "runs": [asdict(r) | {"ratio": r.ratio} for r in c.runs]}
                  for c in cases],
    }
    (args.out / f"{stamp}-{fixture.name}.md").write_text(table)
    (args.out / f"{stamp}-{fixture.name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    shutil.copyfile(args.out / f"{stamp}-{fixture.name}.md", args.out / "latest.md")
    shutil.copyfile(args.out / f"{stamp}-{fixture.name}.json", args.out / "latest.json")
    print(f"written: {(args.out / stamp).relative_to(REPO_DIR) if args.out.is_relative_to(REPO_DIR) else args.out}"
          f"-{fixture.name}.{{md,json}}")
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a benchmark reports; it never fails the caller
        print(f"bench/run.py: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(0)
