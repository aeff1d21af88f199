"""Which threads hold the interpreter lock (GIL) during a merge, and where: py-spy's `--gil` samples.

    python bench/gil_profile.py --out gil.json -- python -m hf_metagpt merge --base B M1 M2 --output OUT

A merge's compute workers, readers and writer are Python threads: while one of them runs Python
code (or a C call that keeps the lock) the others wait to come back from their torch calls or
system calls. The seconds each role holds the lock are serial work for the whole merge, whatever
the number of cores: on 16 cores, ~2 s of them put a floor of ~2 s under the loop, and threads
queue for the lock long before it is 100 % busy. `HF_METAGPT_TIMELINE` (engine/timeline.py) says
how long each role was busy and how long it waited for a core; this says how much of that busy
time held the lock, and on which lines.

py-spy (a sampling profiler; not a dependency of the project) is looked for on PATH, then
installed from a wheel in the ignored `.whl/` folder (carried to the lent machine, as mergekit's
are: `pip download py-spy --only-binary=:all: --no-deps -d .whl`). It samples the process `--rate`
times a second and keeps, per sample, the stack of the thread that holds the lock (none when no
thread does); `seconds = samples / rate`. It needs ptrace rights on the child it starts
(root, or `kernel.yama.ptrace_scope` 0/1).

`--nonblocking`: py-spy reads the process's memory without stopping it. Its default mode stops
every thread for each sample, and that distorts exactly what is measured here: in a warm 1.1B
merge on 2 cores it put 7.0 s of a 10.7 s run under the lock (1.75 s of the workers' on one
`time.thread_time()` line, a system call that costs 11 ms in all over the run's 1 054 calls,
timed without a profiler), against 2.7 s without stopping the process. A test program with one
thread in a pure-Python loop for 4 s and one in `torch.dot` calls reads 3.6 s and 0.01 s.

Writes JSON: wall seconds, seconds of lock held per role (main, workers, readers, writer,
preload, readahead, other) and in total, the share of the wall the lock was held, and the lines holding it
longest. Exits with the command's exit status (py-spy's when it could not run the command).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SITE = Path(tempfile.gettempdir()) / "hf-metagpt-pyspy-site"

#: thread-name prefixes of the engine's threads (engine/merging.Workers, feed, writer, insight/plots.preload)
ROLES = (("hf-metagpt-merge", "workers"), ("hf-metagpt-readahead", "readahead"), ("hf-metagpt-read", "readers"),
         ("hf-metagpt-write", "writer"), ("hf-metagpt-import-plots", "preload"), ("MainThread", "main"))
_THREAD = re.compile(r"^thread \((?P<id>(?:0x)?[0-9a-fA-F]+)\)(?::\s*(?P<name>.*))?$")


def role_of(thread: str, names: dict[str, str] | None = None) -> str:
    """The role of a py-spy thread label (`thread (123): hf-metagpt-merge_0` → "workers").

    A label without a name (`thread (123)`: sampled before the thread had one, e.g. the main
    thread before `threading` is imported) takes the name `names` knows for the same thread id.
    """
    m = _THREAD.match(thread.strip())
    name = (m.group("name") or (names or {}).get(m.group("id"), "")) if m else thread
    for prefix, role in ROLES:
        if name.startswith(prefix):
            return role
    return "other"


def summarize(raw_lines: list[str], rate: float, wall: float, top: int = 12) -> dict:
    """py-spy `-f raw --threads` lines (`frames;...;leaf count`) → seconds of the lock per role and line."""
    by_role: Counter[str] = Counter()
    by_line: Counter[tuple[str, str]] = Counter()
    names: dict[str, str] = {}
    for line in raw_lines:
        m = _THREAD.match(line.split(";", 1)[0].rpartition(" ")[0] if ";" not in line else line.split(";", 1)[0])
        if m and m.group("name"):
            names[m.group("id")] = m.group("name")
    for line in raw_lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        role = role_of(frames[0], names)
        by_role[role] += n
        leaf = frames[-1] if len(frames) > 1 else "(no Python frame)"
        by_line[(role, leaf)] += n
    held = sum(by_role.values()) / rate
    roles = ("main", "workers", "readers", "writer", "preload", "readahead", "other")
    return {
        "rate": rate,
        "wall_s": round(wall, 3),
        "gil_held_s": round(held, 3),
        "gil_share_of_wall": round(held / wall, 3) if wall > 0 else None,
        "by_role_s": {r: round(by_role.get(r, 0) / rate, 3) for r in roles},
        "top_lines": [{"role": r, "line": leaf, "seconds": round(n / rate, 3)}
                      for (r, leaf), n in by_line.most_common(top)],
    }


def find_py_spy(given: str | None = None) -> str | None:
    """py-spy to run: given, on PATH, or installed once from `.whl/py_spy-*.whl` (None: not available)."""
    if given:
        return given
    on_path = shutil.which("py-spy")
    if on_path:
        return on_path
    exe = SITE / "bin" / "py-spy"
    if not exe.exists():
        wheels = sorted((REPO_DIR / ".whl").glob("py_spy-*.whl"))
        if not wheels:
            return None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(SITE), str(wheels[-1])], capture_output=True, text=True)
    return str(exe) if exe.exists() else None


def profile(command: list[str], out: Path, *, rate: float = 100.0, py_spy: str | None = None,
            env: dict | None = None) -> tuple[int, dict | None]:
    """Run `command` under `py-spy record --gil`; write the summary to `out` and return (exit status, summary)."""
    exe = find_py_spy(py_spy)
    if exe is None:
        return 127, None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "gil.raw"
        argv = [exe, "record", "--gil", "--nonblocking", "--threads", "-f", "raw", "-r", str(int(rate)), "-o", str(raw), "--", *command]
        t = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        if not raw.exists():
            sys.stderr.write(proc.stderr[-2000:])
            return proc.returncode or 1, None
        summary = summarize(raw.read_text().splitlines(), rate, wall)
    summary["command"] = command
    summary["exit"] = proc.returncode
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return proc.returncode, summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: gil_profile.py [--out F] [--rate HZ] [--py-spy EXE] -- COMMAND...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gil_profile.json"))
    p.add_argument("--rate", type=float, default=100.0, help="samples per second (default 100)")
    p.add_argument("--py-spy", default=None, help="py-spy executable (default: PATH, else .whl/py_spy-*.whl)")
    args = p.parse_args(argv[:cut])
    code, summary = profile(argv[cut + 1:], args.out, rate=args.rate, py_spy=args.py_spy)
    if summary is None:
        print("py-spy is not available (PATH or .whl/py_spy-*.whl), or it could not run the command", file=sys.stderr)
        return code
    roles = ", ".join(f"{r} {s:.2f}" for r, s in summary["by_role_s"].items() if s)
    print(f"GIL held {summary['gil_held_s']:.2f} s of {summary['wall_s']:.2f} s wall "
          f"({100 * (summary['gil_share_of_wall'] or 0):.0f} %): {roles}")
    for t in summary["top_lines"][:6]:
        print(f"  {t['seconds']:6.2f} s  {t['role']:8s} {t['line']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
