"""One command for a lent machine (many cores, a GPU): fixture, floors, timings, CPU-vs-CUDA bytes, one table.

    python bench/device_check.py                       # 1.1B fixture, 450 s budget, results under $OUT or bench/results
    python bench/device_check.py --size tiny --budget 240   # a quick run on a small machine (no CUDA: those rows skipped)

What it does, in this order, each step skipped rather than run past `--budget` seconds:

1. builds the fixture with `bench/make_fixture.py` on every core (timed; the same bytes whatever the worker count);
2. installs mergekit from wheels in `.whl/` into a private folder when it is not importable (the device
   tool carries them; see bench/README.md), or uses `--mergekit-exe` / `bench/.venv-mergekit`;
3. merges a small family with every deterministic method on the CPU and on CUDA and compares the bytes
   (`tests/methods/test_cuda.py`'s cases; the largest difference in output ulps where they differ), the
   fused-kernel cases also with GPU staging on (`HF_METAGPT_GPU_STAGING=1`, engine/staging.py);
   then the kernel scaling sweep (bench/kernel_scaling.py, ~30 s; `--small` for a fixture under 1 GB): the
   engine's CPU jobs on 1..16 threads and merge chunks 2^14..2^20 beside a memory-bandwidth reference
   (`kernel_scaling.json`, its table in the report);
4. takes the read+write floor cold (the inputs evicted from the page cache with posix_fadvise, the
   libraries left cached; `--drop-caches` drops the whole page cache instead, the interpreter's and
   torch's files too) and warm (inputs in the page cache);
5. times, in rounds while the budget lasts: hf-metagpt on CPU and CUDA × model and layer granularity,
   the CUDA layer merge with GPU staging on (its bytes against the plain CUDA run's), each cold then warm
   (wall, user/sys CPU, peak RSS), and compares the bytes of the 1.1B MetaGPT output of CPU and CUDA;
   mergekit 0.1.5 task_arithmetic on CPU (cold and warm) and `--cuda` (cold; warm it was never its best
   mode there) in the first round only (its times do not change with this engine), so the table shows
   medians of hf-metagpt where the budget allowed more runs;
6. after the first round, the warm CPU layer merge once more under py-spy `--gil` (bench/gil_profile.py;
   py-spy from PATH or a wheel in `.whl/`): the seconds each role held the interpreter lock;
7. after the second round (or the only one), once each, at low priority (each skipped when it does not
   fit): mergekit `--gpu-rich --async-write` (the slowest mode there before); the CUDA model merge with
   GPU staging on (warm); the CPU model merge with `--workers 4` and with `--num-processes 4` (warm; same
   bytes as the default run?), to learn whether processes scale where threads do not; the CPU layer merge
   with the start-up read-ahead off (`HF_METAGPT_READAHEAD_MB=0`, cold); the CPU layer merge with
   `HF_METAGPT_MERGE_CHUNK` set to the sweep's fastest chunk at the most threads, when that is not the
   default (warm; same bytes as the default run?).

Every hf-metagpt run writes its time account (`HF_METAGPT_TIMELINE`, stored in its JSON line as "timeline"),
and a second table says where the warm runs' time went: phases, each role's busy seconds, the main thread's waits,
how many readers and compute workers were busy on average. The first warm run of each hf-metagpt row is
also traced (`HF_METAGPT_TRACE`): `traces.json`, one process per row, opens in https://ui.perfetto.dev.

Everything goes to `--out` (default $OUT, else bench/results/device-STAMP): `device_check.jsonl` (one JSON
object per measurement), `device_check.log`, `device_check.md` (the tables), printed last, `traces.json`. Exits 0: it
reports, the tests judge.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import run as bench  # noqa: E402  (bench/run.py: timed, evict, shard_files, mergekit_case)

#: hf-metagpt writes its time account to this file when set (`hf_metagpt.constants.TIMELINE_ENV`;
#: spelled out: this script never imports the package, so torch stays out of its process)
TIMELINE_ENV = "HF_METAGPT_TIMELINE"
#: hf-metagpt writes when each of its threads worked to this file when set (`hf_metagpt.constants.TRACE_ENV`)
TRACE_ENV = "HF_METAGPT_TRACE"
#: the first warm run of every hf-metagpt row, traced, as one Chrome/Perfetto file (a process per row): the
#: device tool brings back at most 8 files, so not one file per row
TRACES = "traces.json"
#: megabytes the CLI reads ahead while torch is imported (`hf_metagpt.constants.READAHEAD_ENV`; 0: off)
READAHEAD_ENV = "HF_METAGPT_READAHEAD_MB"
#: the sweep's fastest merge chunk gets its own merge row only when this much faster than the default
CHUNK_GAIN = 0.05
#: `1`: a GPU merge copies pieces on the reader thread from pinned buffers (`hf_metagpt.constants.GPU_STAGING_ENV`)
GPU_STAGING_ENV = "HF_METAGPT_GPU_STAGING"
#: methods whose CUDA merge runs the fused GPU kernel, the one GPU staging changes (`merging.GpuFusedKernel`)
FUSED_METHODS = ("metagpt", "linear", "task_arithmetic")
#: elements per chunk of the CPU weighted sum (`hf_metagpt.constants.MERGE_CHUNK_ENV`)
MERGE_CHUNK_ENV = "HF_METAGPT_MERGE_CHUNK"
#: seconds of rows the kernel scaling sweep may start (bench/kernel_scaling.py --budget), and its margin
#: for starting torch and making its data
SCALING_S, SCALING_MARGIN_S = 25.0, 15.0

#: Seconds a row is assumed to take before it has run once (per GB of input), and kept in reserve.
FIRST_GUESS_S_PER_GB = 4.0
RESERVE_S = 8.0


class Check:
    """The run's clock, log and JSON lines."""

    def __init__(self, out: Path, budget: float) -> None:
        self.t0 = time.monotonic()
        self.budget = budget
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_f = open(out / "device_check.log", "a")
        self.jsonl = open(out / "device_check.jsonl", "a")
        self.records: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def record(self, **rec) -> dict:
        rec = {"t": round(time.monotonic() - self.t0, 1), **rec}
        self.records.append(rec)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        return rec

    def fits(self, seconds: float) -> bool:
        return self.left() - RESERVE_S >= seconds


# --------------------------------------------------------------------------- machine


def probe_cuda() -> dict:
    """GPU name and torch version, from a subprocess (this process never imports torch)."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': c, 'gpu': torch.cuda.get_device_name(0) if c else None}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"torch": None, "cuda": False, "gpu": None, "error": r.stderr[-300:]}


def drop_caches(inputs: list[Path], system: bool) -> str:
    """Cold: the whole page cache dropped (root, `--drop-caches`) or these files evicted (anyone)."""
    os.sync()
    if system:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    bench.evict(inputs)
    return "fadvise"


def warm(inputs: list[Path]) -> None:
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=False)


def floor(inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float]:
    """`cat` of every input, then a `dd` of an output-sized file with fsync (deleted afterwards)."""
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor-write.bin"
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=False)
    read = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={out_bytes}", "iflag=count_bytes",
                    "conv=fsync", "status=none"], check=False)
    write = time.perf_counter() - t
    bench.evict([target])
    target.unlink(missing_ok=True)
    return read, write


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("model*.safetensors")):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- steps


def build_fixture(chk: Check, size: str, where: Path, workers: int | None) -> Path | None:
    fixture = where / f"llama-{size}"
    if (fixture / "base").is_dir() and (fixture / "task_c").is_dir():
        chk.log(f"fixture {fixture} exists: reused")
        chk.record(kind="fixture", reused=True)
        return fixture
    argv = [sys.executable, str(BENCH_DIR / "make_fixture.py"), "--size", size, "--out", str(fixture), "--overwrite"]
    if workers:
        argv += ["--workers", str(workers)]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    ok = r.returncode == 0
    chk.log(f"fixture {size}: {wall:.1f} s ({os.cpu_count()} cores) " + ("" if ok else "FAILED " + r.stderr[-400:]))
    chk.record(kind="fixture", size=size, wall_s=round(wall, 2), ok=ok, workers=workers or os.cpu_count())
    return fixture if ok else None


def mergekit_exe(chk: Check, given: str | None) -> tuple[list[str] | None, dict, str]:
    """(argv prefix, env, version) of mergekit-yaml: given, carried wheels, or bench/.venv-mergekit."""
    if given:
        return [given], {}, "given"
    wheels = sorted(w for w in (REPO_DIR / ".whl").glob("*.whl") if not w.name.startswith("py_spy-"))  # py-spy: gil_profile
    site = Path("/tmp/hf-metagpt-mergekit-site")
    if wheels:
        if not (site / "bin" / "mergekit-yaml").exists():
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                chk.log("mergekit wheels did not install: " + r.stderr[-300:])
        exe = site / "bin" / "mergekit-yaml"
        if exe.exists():
            env = {"PYTHONPATH": str(site)}
            return [sys.executable, str(exe)], env, "0.1.5 (carried wheels)"
    venv = bench.MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if venv.exists():
        return [str(venv)], {}, "bench/.venv-mergekit"
    return None, {}, "mergekit not available"


def bytes_check(chk: Check, cuda: bool, seconds: float) -> None:
    """CPU vs CUDA bytes of every deterministic method on a small family (a subprocess)."""
    if not cuda:
        chk.record(kind="bytes", case="all", skipped="no CUDA")
        chk.log("CPU vs CUDA bytes: skipped (no CUDA)")
        return
    res = chk.out / "bytes.json"
    argv = [sys.executable, __file__, "--bytes-only", str(res), "--budget", str(int(seconds))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")]))
    try:
        subprocess.run(argv, env=env, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired:
        chk.log("CPU vs CUDA bytes: timed out")
    rows = json.loads(res.read_text()) if res.exists() else []
    for row in rows:
        chk.record(kind="bytes", **row)
    same = sum(r.get("identical") is True for r in rows)
    chk.log(f"CPU vs CUDA bytes: {same} of {len(rows)} cases identical; "
            + ", ".join(f"{r['case']} ({r.get('max_ulps', r.get('error', '?'))} ulps)" for r in rows
                        if r.get("identical") is not True))


def bytes_only(result: Path, budget: float) -> int:
    """Child of `bytes_check`: merges each case on both devices in this process."""
    import importlib.util
    import tempfile

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO_DIR))
    spec = importlib.util.spec_from_file_location("test_cuda", REPO_DIR / "tests" / "methods" / "test_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    t0 = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base, fts = mod.family(Path(tmp) / "family")
        for case in mod.DETERMINISTIC_CASES:
            if time.monotonic() - t0 > budget:
                rows.append({"case": case[0], "skipped": "budget"})
                continue
            row: dict = {"case": case[0]}
            try:
                outs = {}
                for device in ("cpu", "cuda"):
                    out = Path(tmp) / f"{case[0]}-{device}"
                    t = time.perf_counter()
                    row[device] = mod.merge_digest(base, fts, out, case, device)
                    row[f"{device}_s"] = round(time.perf_counter() - t, 2)
                    outs[device] = out
                row["identical"] = bool(row["cpu"]) and row["cpu"] == row["cuda"]
                if case[1] in FUSED_METHODS:  # the same merge with GPU staging on (engine/staging.py)
                    os.environ[GPU_STAGING_ENV] = "1"
                    try:
                        staged = mod.merge_digest(base, fts, Path(tmp) / f"{case[0]}-staged", case, "cuda")
                    finally:
                        os.environ.pop(GPU_STAGING_ENV, None)
                    row["staged_identical"] = staged == row["cpu"]
                    row["identical"] = row["identical"] and row["staged_identical"]
                if not row["identical"]:
                    a = {k: v for f in sorted(outs["cpu"].glob("model*.safetensors")) for k, v in load_file(f).items()}
                    b = {k: v for f in sorted(outs["cuda"].glob("model*.safetensors")) for k, v in load_file(f).items()}
                    row["tensors_differing"] = sum(not torch.equal(a[k], b[k]) for k in a)
                    row["tensors"] = len(a)
                    row["max_ulps"] = max(_ulps(a[k], b[k]) for k in a)
                del row["cpu"], row["cuda"]
            except Exception as e:  # noqa: BLE001 — reported in the row
                row["identical"], row["error"] = None, f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            result.write_text(json.dumps(rows))
    result.write_text(json.dumps(rows))
    return 0


def _ulps(a, b) -> int:
    import torch

    if not a.is_floating_point() or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return 0 if torch.equal(a, b) else 1 << 30
    bits = 16 if a.element_size() == 2 else 32
    ints = torch.int16 if bits == 16 else torch.int32
    ia, ib = a.view(ints).long(), b.view(ints).long()
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def kernel_scaling(chk: Check, small: bool) -> tuple[str, int | None]:
    """bench/kernel_scaling.py in a subprocess (~30 s; `--small`: seconds): its JSON kept as kernel_scaling.json.

    Returns its markdown table ("" when skipped or failed) and the fastest merge chunk at the most threads
    when that is not the default (None otherwise): the chunk the low-priority chunk row merges with."""
    if not chk.fits(SCALING_S + SCALING_MARGIN_S):
        chk.log(f"skip kernel scaling: {SCALING_S + SCALING_MARGIN_S:.0f} s would not fit in {chk.left():.0f} s left")
        chk.record(kind="kernel_scaling", skipped="budget")
        return "", None
    res = chk.out / "kernel_scaling.json"
    argv = [sys.executable, str(BENCH_DIR / "kernel_scaling.py"), "--out", str(res), "--budget", str(SCALING_S)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    try:
        r = subprocess.run(argv + (["--small"] if small else []), env=env, capture_output=True, text=True,
                           timeout=SCALING_S + SCALING_MARGIN_S + 30)
        note = "" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-300:]}"
    except subprocess.TimeoutExpired:
        note = "timed out"
    rep = json.loads(res.read_text()) if res.exists() and not note else None
    if rep is None:
        chk.log(f"kernel scaling failed: {note or 'no JSON'}")
        chk.record(kind="kernel_scaling", skipped=note or "no JSON")
        return "", None
    best = rep.get("best") or {}
    chk.record(kind="kernel_scaling", wall_s=round(time.perf_counter() - t, 1), bit_identical=rep["bit_identical"],
               best=best, skipped_rows=len(rep["skipped"]), elements=rep["elements"])
    chk.log(f"kernel scaling: {time.perf_counter() - t:.1f} s, bit-identical {rep['bit_identical']}, best {best}")
    chunk = best.get("chunk")
    # Worth a full merge only when clearly faster than the default chunk, not within a sweep's noise.
    faster = (best.get("wall_s") or 0) < (1 - CHUNK_GAIN) * (best.get("default_wall_s") or 0)
    return rep["table"], chunk if chunk and chunk != best.get("default_chunk") and faster else None


# --------------------------------------------------------------------------- timed rows


def rows_for(models: list[Path], out_root: Path, cuda: bool, mk: tuple[list[str] | None, dict, str],
             merge_chunk: int | None = None) -> list[dict]:
    """The table's rows: name, argv, env, output folder, and why it is skipped (if it is).

    `merge_chunk`: the kernel scaling sweep's fastest chunk, when not the default: one more low-priority row."""
    py = [sys.executable, "-m", "hf_metagpt"]
    rows = []
    for device in ("cpu", "cuda"):
        for gran in ("model", "layer"):
            out = out_root / f"hf-{device}-{gran}"
            rows.append({"name": f"hf-metagpt --device {device} --granularity {gran}", "tool": "hf-metagpt",
                         "device": device, "granularity": gran, "output": out,
                         "argv": py + ["merge", "--base", str(models[0]), *map(str, models[1:]), "--output", str(out),
                                       "--granularity", gran, "--device", device, "--overwrite", "-q"],
                         "env": {"PYTHONPATH": str(REPO_DIR)},
                         "skip": "" if device == "cpu" or cuda else "no CUDA"})
    prefix, mk_env, version = mk
    cfg = bench.mergekit_case(models, out_root, Path("mergekit-yaml"), "").argv[1]
    for label, flags, needs_cuda in (("CPU", [], False), ("--cuda", ["--cuda"], True),
                                     ("--gpu-rich --async-write", ["--gpu-rich", "--async-write"], True)):
        out = out_root / f"mergekit-{len(flags)}"
        # Timed in the first round only (its figures do not change with this engine); `--gpu-rich`, the
        # slowest mode on the lent machine cold and warm (bench/README), at low priority.
        # `--cuda` cold only: warm it was never mergekit's best mode there (25.3 s against 17.5 s on the CPU).
        rows.append({"name": f"mergekit 0.1.5 task_arithmetic {label}", "tool": "mergekit", "once": True,
                     "low": "--gpu-rich" in flags, **({"modes": ("cold",)} if flags == ["--cuda"] else {}),
                     "device": "cuda" if needs_cuda else "cpu", "granularity": "-", "output": out,
                     "argv": (prefix or ["mergekit-yaml"]) + [cfg, str(out), *bench.MERGEKIT_FLAGS, *flags],
                     "env": mk_env,
                     "skip": version if prefix is None else ("no CUDA" if needs_cuda and not cuda else "")})
    # GPU staging (engine/staging.py, off by default until measured): the CUDA layer row with the
    # pieces copied on the reader thread from pinned buffers; its bytes against the plain CUDA run's.
    plain = next(r for r in rows if r["device"] == "cuda" and r["granularity"] == "layer")
    plain["digest"] = True
    for gran, low in (("layer", False), ("model", True)):
        out = out_root / f"hf-cuda-{gran}-staged"
        rows.append({"name": f"hf-metagpt --device cuda --granularity {gran}, {GPU_STAGING_ENV}=1", "tool": "hf-metagpt",
                     "device": "cuda", "granularity": gran, "output": out, "digest": True, "low": low,
                     "same_as": next(r["name"] for r in rows if r["device"] == "cuda" and r["granularity"] == gran
                                     and r["tool"] == "hf-metagpt"),
                     **({"modes": ("warm",)} if low else {}),
                     "argv": py + ["merge", "--base", str(models[0]), *map(str, models[1:]), "--output", str(out),
                                   "--granularity", gran, "--device", "cuda", "--overwrite", "-q"],
                     "env": {"PYTHONPATH": str(REPO_DIR), GPU_STAGING_ENV: "1"}, "skip": "" if cuda else "no CUDA"})
    # Low priority, warm only, after every other row: do processes scale where threads do not?
    for label, flags in (("--workers 4", ["--workers", "4"]), ("--num-processes 4", ["--num-processes", "4"])):
        out = out_root / f"hf-cpu-model-{flags[0].strip('-')}"
        rows.append({"name": f"hf-metagpt --device cpu --granularity model {label}", "tool": "hf-metagpt",
                     "device": "cpu", "granularity": "model", "output": out, "low": True, "modes": ("warm",),
                     "argv": py + ["merge", "--base", str(models[0]), *map(str, models[1:]), "--output", str(out),
                                   "--granularity", "model", "--device", "cpu", *flags, "--overwrite", "-q"],
                     "env": {"PYTHONPATH": str(REPO_DIR)}, "skip": ""})
    # Low priority, cold only: the read-ahead during start-up off (engine/readahead.py; on by default from
    # 8 cores), beside the default cold CPU layer row: does reading while torch imports pay there?
    out = out_root / "hf-cpu-layer-no-readahead"
    rows.append({"name": "hf-metagpt --device cpu --granularity layer, HF_METAGPT_READAHEAD_MB=0", "tool": "hf-metagpt",
                 "device": "cpu", "granularity": "layer", "output": out, "low": True, "modes": ("cold",),
                 "argv": py + ["merge", "--base", str(models[0]), *map(str, models[1:]), "--output", str(out),
                               "--granularity", "layer", "--device", "cpu", "--overwrite", "-q"],
                 "env": {"PYTHONPATH": str(REPO_DIR), READAHEAD_ENV: "0"}, "skip": ""})
    if merge_chunk:
        rows.append(chunk_row(rows, models, out_root, merge_chunk))
    return rows


def chunk_row(rows: list[dict], models: list[Path], out_root: Path, merge_chunk: int) -> dict:
    """Low priority, warm only: the CPU layer merge with HF_METAGPT_MERGE_CHUNK at the sweep's fastest chunk,
    its bytes compared with the default CPU layer row's (both digested)."""
    default = next(r for r in rows if r["tool"] == "hf-metagpt" and r["device"] == "cpu"
                   and r["granularity"] == "layer" and not r.get("low"))
    default["digest"] = True
    out = out_root / "hf-cpu-layer-chunk"
    argv = list(default["argv"])
    argv[argv.index("--output") + 1] = str(out)
    return {"name": f"hf-metagpt --device cpu --granularity layer, {MERGE_CHUNK_ENV}={merge_chunk}",
            "tool": "hf-metagpt", "device": "cpu", "granularity": "layer", "output": out, "low": True,
            "modes": ("warm",), "argv": argv, "digest": True, "same_as": default["name"],
            "env": {"PYTHONPATH": str(REPO_DIR), MERGE_CHUNK_ENV: str(merge_chunk)}, "skip": ""}


def rounds(chk: Check, rows: list[dict], inputs: list[Path], out_bytes: int, out_root: Path, repeat: int,
           system_drop: bool) -> str:
    """The timed rows, in rounds while the budget lasts; returns the GIL profile's line ("" when skipped).

    Each round takes the floors, then every main row cold and warm (a row marked `once`, mergekit's,
    in the first round only). After the first round the GIL profile; after the second (or the only)
    round the low-priority rows, once each: a third median of the main rows is worth less than them.
    """
    main = [r for r in rows if not r["skip"] and not r.get("low")]
    low = [r for r in rows if not r["skip"] and r.get("low")]
    in_gb = sum(f.stat().st_size for f in inputs) / 1e9
    gil = ""
    for rep in range(repeat):
        if not chk.fits(5):
            break
        for mode in ("cold", "warm"):
            how = drop_caches(inputs, system_drop) if mode == "cold" else (warm(inputs) or "cat")
            r, w = floor(inputs, out_bytes, out_root / "floor")
            chk.record(kind="floor", mode=mode, cache=how, read_s=round(r, 2), write_s=round(w, 2), rep=rep)
            chk.log(f"floor {mode}: read {r:.1f} s + write {w:.1f} s ({in_gb:.1f} GB in, {out_bytes / 1e9:.1f} GB out)")
        for row in main:
            if rep and row.get("once"):
                continue
            for mode in row.get("modes", ("cold", "warm")):
                measure(chk, row, mode, inputs, system_drop)
        if rep == 0:  # after the first round, before repeats use up the budget (it never ran last)
            gil = gil_check(chk, rows, inputs)
        if rep == min(1, repeat - 1):
            for row in low:
                for mode in row.get("modes", ("cold", "warm")):
                    measure(chk, row, mode, inputs, system_drop)
    return gil


def measure(chk: Check, row: dict, mode: str, inputs: list[Path], system_drop: bool) -> dict | None:
    """One run of a row, cold (caches dropped first) or warm (inputs read into the page cache first)."""
    est = row.get("est") or FIRST_GUESS_S_PER_GB * sum(f.stat().st_size for f in inputs) / 1e9 + 5
    if not chk.fits(est):
        chk.log(f"skip {row['name']} ({mode}): {est:.0f} s would not fit in {chk.left():.0f} s left")
        return None
    shutil.rmtree(row["output"], ignore_errors=True)
    how = drop_caches(inputs, system_drop) if mode == "cold" else (warm(inputs) or "cat")
    env = dict(os.environ)
    for k, v in row["env"].items():
        env[k] = os.pathsep.join([v, env[k]]) if env.get(k) else v
    account = chk.out / "timeline.json"  # hf-metagpt's time account of this run (HF_METAGPT_TIMELINE)
    account.unlink(missing_ok=True)
    if row["tool"] == "hf-metagpt":
        env[TIMELINE_ENV] = str(account)
    else:
        env.pop(TIMELINE_ENV, None)
    trace = chk.out / "trace.json"  # when each thread worked (HF_METAGPT_TRACE): the row's first warm run
    trace.unlink(missing_ok=True)
    env.pop(TRACE_ENV, None)
    if row["tool"] == "hf-metagpt" and mode == "warm" and not row.get("traced"):
        env[TRACE_ENV] = str(trace)
    # A hung run (a deadlock on an untried device path) is killed rather than let take the budget.
    run = timed_env(row["name"], row["argv"], env, timeout=max(60.0, min(4 * est, chk.left())))
    ok = run.ok and any(row["output"].glob("*.safetensors"))
    rec = {"kind": "run", "row": row["name"], "tool": row["tool"], "device": row["device"],
           "granularity": row["granularity"], "mode": mode, "cache": how, "ok": ok,
           "wall_s": round(run.wall_s, 2), "user_s": run.user_s, "sys_s": run.sys_s,
           "peak_rss_gb": round(run.peak_rss_bytes / 1e9, 3) if run.peak_rss_bytes else None,
           "note": run.note if not ok and run.note else ("no .safetensors written" if not ok else ""),
           "summary": run.summary}
    if account.exists():
        try:
            rec["timeline"] = json.loads(account.read_text())
        except ValueError:
            rec["timeline"] = None
        account.unlink()
    if trace.exists():
        row["traced"] = add_trace(chk, row["name"], trace)
    if ok and row["tool"] == "hf-metagpt" and (row["granularity"] == "model" or row.get("digest")) and "sha256" not in row:
        row["sha256"] = rec["sha256"] = digest(row["output"])
    row["est"] = max(run.wall_s, 1.0) * 1.15
    chk.record(**rec)
    chk.log(f"{row['name']} {mode}: {run.wall_s:.1f} s, user {run.user_s} s, RSS {rec['peak_rss_gb']} GB"
            + ("" if ok else f" FAILED {rec['note']}"))
    bench.clear_output(row["output"])
    return rec


def add_trace(chk: Check, name: str, trace: Path) -> bool:
    """One run's trace into `TRACES` under the results (rewritten whole: a cut-short check keeps what it
    has), as a process of its own named after the row; the run's own file removed."""
    try:
        d = json.loads(trace.read_text())
    except ValueError:
        return False
    finally:
        trace.unlink(missing_ok=True)
    traces = chk.out / TRACES
    whole = json.loads(traces.read_text()) if traces.exists() else {"traceEvents": [], "otherData": {}}
    pid = len(whole["otherData"]) + 1
    for e in d["traceEvents"]:
        e["pid"] = pid
        if e["name"] == "process_name":
            e["args"] = {"name": f"{name} (warm)"}
    whole["traceEvents"] += d["traceEvents"]
    whole["otherData"][name] = d.get("otherData", {})
    traces.write_text(json.dumps(whole, separators=(",", ":")) + "\n")
    return True


def timed_env(name: str, argv: list[str], env: dict, timeout: float | None = None) -> "bench.Run":
    """bench.timed with an environment (and `timeout`), keeping the last line of stdout (hf-metagpt's summary)."""
    import tempfile

    out = tempfile.NamedTemporaryFile("w+", suffix=".out", delete=False)
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        run = bench.timed(name, argv, stdout=out, timeout=timeout)
    finally:
        os.environ.clear()
        os.environ.update(old)
    out.seek(0)
    lines = [x for x in out.read().splitlines() if x.strip()]
    out.close()
    os.unlink(out.name)
    run.summary = lines[-1][:300] if lines else ""  # type: ignore[attr-defined]
    return run


# --------------------------------------------------------------------------- table


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(x, spec=".1f", unit=""):
    return "—" if x is None else f"{x:{spec}}{unit}"


def table(chk: Check, rows: list[dict], meta: dict) -> str:
    recs = chk.records
    floors = {m: [r for r in recs if r.get("kind") == "floor" and r["mode"] == m] for m in ("cold", "warm")}
    fl = {m: _med([r["read_s"] + r["write_s"] for r in floors[m]]) for m in floors}
    runs = {r["name"]: [x for x in recs if x.get("kind") == "run" and x["row"] == r["name"] and x["ok"]] for r in rows}

    def med(name, mode, key="wall_s"):
        return _med([x[key] for x in runs[name] if x["mode"] == mode])

    mk = [r["name"] for r in rows if r["tool"] == "mergekit"]
    best = {m: min([w for w in (med(n, m) for n in mk) if w is not None], default=None) for m in ("cold", "warm")}
    lines = [f"### {meta['title']}", "", meta["machine_line"], "",
             "| run | cold wall | ÷ cold floor | warm wall | ÷ warm floor | user CPU (warm) | peak RSS | "
             "best mergekit ÷ this (cold / warm) | n (cold/warm) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in ("cold", "warm"):
        if floors[m]:
            r = floors[m]
            lines.append(f"| floor ({m}): `cat` inputs + `dd` output size (fsync) | "
                         + (f"{fl[m]:.1f} s ({_med([x['read_s'] for x in r]):.1f} + {_med([x['write_s'] for x in r]):.1f})"
                            if m == "cold" else "—")
                         + " | — | "
                         + (f"{fl[m]:.1f} s ({_med([x['read_s'] for x in r]):.1f} + {_med([x['write_s'] for x in r]):.1f})"
                            if m == "warm" else "—")
                         + f" | — | — | — | — | {len(r)} |")
    for r in rows:
        if r["skip"]:
            lines.append(f"| {r['name']} | skipped: {r['skip']} | | | | | | | |")
            continue
        c, w = med(r["name"], "cold"), med(r["name"], "warm")
        if c is None and w is None:
            failed = [x.get("note") for x in chk.records if x.get("row") == r["name"] and not x.get("ok")]
            why = ("failed: " + str(failed[0])[:120]) if failed else "not run (time budget)"
            lines.append(f"| {r['name']} | {why} | | | | | | | |")
            continue
        rss = _med([x["peak_rss_gb"] for x in runs[r["name"]]])
        user = med(r["name"], "warm", "user_s") or med(r["name"], "cold", "user_s")
        spd = [_f(best[m] / v if best[m] and v else None, ".2f", "×") for m, v in (("cold", c), ("warm", w))]
        n = [sum(x["mode"] == m for x in runs[r["name"]]) for m in ("cold", "warm")]
        lines.append(f"| {r['name']} | {_f(c, '.1f', ' s')} | {_f(c / fl['cold'] if c and fl['cold'] else None, '.2f', '×')} "
                     f"| {_f(w, '.1f', ' s')} | {_f(w / fl['warm'] if w and fl['warm'] else None, '.2f', '×')} "
                     f"| {_f(user, '.0f', ' s')} | {_f(rss, '.2f', ' GB')} | {spd[0]} / {spd[1]} | {n[0]}/{n[1]} |")
    extra = []
    fx = [r for r in recs if r.get("kind") == "fixture" and not r.get("reused")]
    if fx:
        extra.append(f"fixture built in {fx[0]['wall_s']:.1f} s on {fx[0].get('workers')} processes")
    model_rows = [r for r in rows if r["tool"] == "hf-metagpt" and r["granularity"] == "model"]
    shas = {r["device"]: r.get("sha256") for r in model_rows if not r.get("low")}
    if shas.get("cpu") and shas.get("cuda"):
        extra.append("MetaGPT output CPU vs CUDA: " + ("identical bytes" if shas["cpu"] == shas["cuda"] else "DIFFERENT bytes"))
    for r in model_rows:
        if r.get("low") and r.get("sha256") and shas.get("cpu"):
            extra.append(f"{r['name']}: " + ("the same bytes as" if r["sha256"] == shas["cpu"] else "OTHER bytes than")
                         + " the default CPU run")
    named = {r["name"]: r for r in rows}
    for r in rows:
        other = named.get(r.get("same_as", ""))
        if other is not None and r.get("sha256") and other.get("sha256"):
            extra.append(f"{r['name']}: " + ("the same bytes as" if r["sha256"] == other["sha256"] else "OTHER bytes than")
                         + f" {other['name']}")
    for r in rows:  # did GPU staging engage? (its counts in the runs' time accounts)
        counts = [x["timeline"]["staging"] for x in runs.get(r["name"], []) if (x.get("timeline") or {}).get("staging")]
        if GPU_STAGING_ENV in r.get("env", {}) and counts:
            c = counts[-1]
            extra.append(f"{r['name']}: {c['copied']} spans copied on the reader thread; the kernel found "
                         f"{c['hits']} inputs staged and copied {c['misses']} itself")
    by = [r for r in recs if r.get("kind") == "bytes"]
    if by and not by[0].get("skipped") == "no CUDA":
        same = [r["case"] for r in by if r.get("identical") is True]
        bad = [f"{r['case']} ({r.get('max_ulps', r.get('error', r.get('skipped')))})" for r in by
               if r.get("identical") is not True]
        extra.append(f"small family, CPU vs CUDA bytes: {len(same)} of {len(by)} cases identical"
                     + (f"; not: {', '.join(bad)}" if bad else ""))
    elif by:
        extra.append("CPU vs CUDA bytes: skipped (no CUDA)")
    return "\n".join(lines + [""] + [f"- {e}" for e in extra]) + "\n"


def time_table(chk: Check, rows: list[dict]) -> str:
    """Where the time went in the warm hf-metagpt runs (medians of their `HF_METAGPT_TIMELINE` accounts).

    Columns: the run's wall as this script timed it; hf-metagpt's phases (startup: process start →
    merge() called; prepare: → the loop; loop: the summary's "time"; finish: card, pictures, publish);
    "outside": the wall the process's own account does not see (exec, interpreter exit; a launcher's
    start with --num-processes); the loop's CPU as cores busy; the main thread's loop split; each
    role's busy seconds summed over its threads, with their CPU seconds and the seconds they waited
    for a core (busy − CPU − queued: blocked on the disk, the GIL or another thread).
    """
    lines = ["### where the time went (warm runs, seconds, medians)", "",
             "| run | wall | startup | prepare | loop | finish | outside | loop cores busy | main thread: reads / "
             "kernel / writer / other | readers busy (cpu / queued) ×n | workers busy (cpu / queued) ×n | "
             "writer busy (cpu / queued), of it fsync+rename | threads busy on average: readers / workers "
             "(no worker busy, s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["tool"] != "hf-metagpt":
            continue
        recs = [x for x in chk.records if x.get("kind") == "run" and x["row"] == r["name"] and x["ok"]
                and x["mode"] == "warm" and x.get("timeline")]
        if not recs:
            continue
        tls = [x["timeline"] for x in recs]

        def m(get):
            return _med([_get(t, get) for t in tls])

        wall = _med([x["wall_s"] for x in recs])
        outside = _med([x["wall_s"] - t["wall"] for x, t in zip(recs, tls)])
        cores = _med([t["cpu"]["loop"] / t["phases"]["loop"] for t in tls if t["phases"]["loop"]])
        th = tls[0]["threads"]

        def busy(role, n=None):
            return (f"{_f(m(('busy', role, 'seconds')))} ({_f(m(('busy', role, 'cpu')))} / "
                    f"{_f(m(('busy', role, 'queued')))})" + (f" ×{n}" if n is not None else ""))

        main = " / ".join(_f(m(("main_thread", k))) for k in ("feed_wait", "kernel", "sink_wait", "other"))
        lines.append(f"| {r['name']} | {_f(wall)} | {_f(m(('phases', 'startup')))} | {_f(m(('phases', 'prepare')))} "
                     f"| {_f(m(('phases', 'loop')))} | {_f(m(('phases', 'finish')))} | {_f(outside)} | {_f(cores)} "
                     f"| {main} | {busy('readers', th.get('readers'))} | {busy('workers', th.get('workers'))} "
                     f"| {busy('writer')}, {_f(m(('busy', 'writer_sync', 'seconds')))} "
                     f"| {_f(m(('concurrency', 'readers', 'mean')), '.2f')} / {_f(m(('concurrency', 'workers', 'mean')), '.2f')} "
                     f"({_f(m(('concurrency', 'no_worker', 'seconds')))}) |")
    if len(lines) == 4:
        return ""
    return "\n".join(lines) + "\n"


def _get(d: dict, keys: tuple):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def gil_check(chk: Check, rows: list[dict], inputs: list[Path]) -> str:
    """Last, when time is left: the warm CPU layer merge again under py-spy `--gil` (bench/gil_profile.py):
    how many seconds each role held the interpreter lock. One line for the report ("" when skipped)."""
    import gil_profile

    row = next((r for r in rows if r["tool"] == "hf-metagpt" and r["device"] == "cpu"
                and r["granularity"] == "layer" and not r["skip"] and not r.get("low")), None)
    if row is None:
        return ""
    est = (row.get("est") or 30.0) * 1.5 + 10
    if not chk.fits(est):
        chk.log(f"skip GIL profile: {est:.0f} s would not fit in {chk.left():.0f} s left")
        return ""
    exe = gil_profile.find_py_spy()
    if exe is None:
        chk.log("skip GIL profile: no py-spy (PATH or .whl/py_spy-*.whl)")
        chk.record(kind="gil", skipped="no py-spy")
        return ""
    shutil.rmtree(row["output"], ignore_errors=True)
    warm(inputs)
    env = dict(os.environ)
    for k, v in row["env"].items():
        env[k] = os.pathsep.join([v, env[k]]) if env.get(k) else v
    code, summary = gil_profile.profile(row["argv"], chk.out / "gil_cpu_layer.json", py_spy=exe, env=env)
    bench.clear_output(row["output"])
    if summary is None:
        chk.log(f"GIL profile failed (exit {code})")
        chk.record(kind="gil", skipped=f"py-spy failed (exit {code})")
        return ""
    chk.record(kind="gil", row=row["name"], **{k: v for k, v in summary.items() if k != "command"})
    roles = ", ".join(f"{r} {v:.2f}" for r, v in summary["by_role_s"].items() if v)
    line = (f"GIL ({row['name']}, warm, under py-spy --gil at {summary['rate']:.0f} Hz): held "
            f"{summary['gil_held_s']:.2f} s of {summary['wall_s']:.2f} s wall; by role (s): {roles}; "
            f"longest: " + "; ".join(f"{t['role']} {t['line']} {t['seconds']:.2f}" for t in summary["top_lines"][:3]))
    chk.log(line)
    return line + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1.1b", help="fixture shape (make_fixture.py --size; 'tiny' for a quick run)")
    p.add_argument("--fixture", type=Path, help="an existing fixture folder (base/, task_*/) instead of building one")
    p.add_argument("--fixtures-dir", type=Path, default=None, help="where to build the fixture (default: a scratch dir)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    p.add_argument("--bytes-budget", type=float, default=90.0, help="seconds for the CPU-vs-CUDA byte comparison")
    p.add_argument("--repeat", type=int, default=3, help="runs of each row at most (medians)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else bench/results/device-STAMP)")
    p.add_argument("--drop-caches", action="store_true", help="cold = echo 3 > /proc/sys/vm/drop_caches (root)")
    p.add_argument("--mergekit-exe", default=None, help="mergekit-yaml to time (default: .whl wheels or the bench venv)")
    p.add_argument("--workers", type=int, default=None, help="make_fixture.py processes (default: one per core)")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-kernel-scaling", action="store_true", help="skip the kernel scaling sweep")
    p.add_argument("--bytes-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bytes_only:
        return bytes_only(args.bytes_only, args.budget)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCH_DIR / "results" / f"device-{stamp}")
    chk = Check(out, args.budget)
    info = probe_cuda()
    cuda = bool(info.get("cuda"))
    cores = os.cpu_count()
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = "RAM ?"
    machine_line = (f"{cores} cores, {ram}, GPU: {info.get('gpu') or 'none'}, torch {info.get('torch')}, "
                    f"load at start {[round(x, 2) for x in os.getloadavg()]}, commit {bench.git_rev()}, {stamp}.")
    chk.log(machine_line)
    chk.record(kind="machine", cores=cores, ram=ram, **info)

    scratch = Path(args.fixtures_dir or ("/tmp/hf-metagpt-device-check"))
    if args.fixture:
        fixture = args.fixture
    else:
        fixture = build_fixture(chk, args.size, scratch, args.workers)
    if fixture is None:
        print(table(chk, [], {"title": "device check: no fixture", "machine_line": machine_line}))
        return 0
    models = [fixture / "base"] + sorted(d for d in fixture.glob("task_*") if d.is_dir())
    inputs = [f for m in models for f in bench.shard_files(m)]
    in_gb = sum(f.stat().st_size for f in inputs) / 1e9
    out_bytes = sum(f.stat().st_size for f in bench.shard_files(models[0]))
    out_root = scratch / "outputs"
    out_root.mkdir(parents=True, exist_ok=True)

    # Untimed warm-up: the first run on a fresh machine builds matplotlib's font cache and the
    # architecture cache (`plan`); a user's second merge does not pay them again.
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "plan", "--base", str(models[0]), *map(str, models[1:])],
                   env=env, capture_output=True)
    chk.log(f"warm-up (font and architecture caches): {time.perf_counter() - t:.1f} s")
    mk = (None, {}, "--no-mergekit") if args.no_mergekit else mergekit_exe(chk, args.mergekit_exe)
    chk.log(f"mergekit: {mk[2]}")
    bytes_check(chk, cuda, min(args.bytes_budget, max(0.0, chk.left() * 0.2)))
    scaling, chunk = ("", None) if args.no_kernel_scaling else kernel_scaling(chk, small=in_gb < 1.0)

    rows = rows_for(models, out_root, cuda, mk, chunk)
    # One write of the output's size first: the first write into fresh pages measures the VM, not the disk.
    floor(inputs[:1], out_bytes, out_root / "floor")
    gil = rounds(chk, rows, inputs, out_bytes, out_root, args.repeat, args.drop_caches)
    shutil.rmtree(out_root, ignore_errors=True)
    meta = {"title": f"device check — {fixture.name} ({len(models)} models, {in_gb:.1f} GB in)",
            "machine_line": machine_line}
    text = table(chk, rows, meta)
    times = time_table(chk, rows)
    text += ("\n" + times) if times else ""
    text += ("\n" + gil) if gil else ""
    text += ("\n" + scaling) if scaling else ""
    (out / "device_check.md").write_text(text)
    chk.log(f"done in {time.monotonic() - chk.t0:.0f} s; results in {out}")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a benchmark reports; it never fails the caller
        import traceback

        traceback.print_exc()
        print(f"bench/device_check.py: {type(e).__name__}: {e}", file=sys.stderr)
        code = 0
    sys.exit(code)
