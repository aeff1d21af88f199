"""Do the CPU merge kernels scale with threads, and at which merge chunk size? One sweep, no disk.

    python bench/kernel_scaling.py                    # 64 Mi elements per model, 1..16 threads (≤ the cores)
    python bench/kernel_scaling.py --small --threads 1,2 --out ks.json   # seconds (the tests)

Synthetic bf16 data, a base and three fine-tunes of `--elements` each, walked by the engine's own
job functions as `merging.FusedKernel` runs them: the Gram (`FusedKernel.reduce`: `gram.task_gram`
over `merging.JOB` spans, summed in job order, `kernels.CHUNK` chunks) and the weighted sum
(`FusedKernel.tensor_jobs` / `run_job`: `kernels.weighted_models` per JOB span into one output, at
several merge chunk sizes: `HF_METAGPT_MERGE_CHUNK`'s values). Each runs on a ThreadPoolExecutor of
1, 2, 4, 8, 12 and 16 threads (at most the core count) and the engine's own compute worker count
(`sizing.plan_workers`: 12 on 16 cores), each thread at one torch thread as
`merging.Workers` sets them. Beside them, on the same JOB spans and threads, two references for the
machine's memory bandwidth: the largest 16-bit pattern of each input ("read") and a copy of each input into
the output ("copy", as many bytes written as read).

Per (kernel, chunk, threads): wall (median of `--repeat`), GB/s of input consumed (4 bf16 inputs),
speedup over 1 thread, CPU seconds (`time.thread_time` summed over the jobs) and the share of the
read reference's GB/s at that thread count. Every threaded result is checked bit for bit against the
1-thread one (merged bytes, each job's output sum, the Gram matrix), and the merged bytes of every
chunk against each other: `bit_identical` in the JSON (`--out`); a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from hf_metagpt.engine import kernels, merging  # noqa: E402

THREADS = (1, 2, 4, 8, 12, 16)
CHUNK_BITS = range(14, 21)
#: elements per model: 4 × 128 MiB of bf16 in, 128 MiB out (far beyond any L3), ~20 s on 16 cores
DEFAULT_ELEMENTS = 64 << 20
#: --small: three JOB spans, the last one ragged
SMALL_ELEMENTS = 2 * merging.JOB + 4097
#: the weighted sum's coefficients (a MetaGPT-like w0·θ0 + Σ λt·θt: every model read, w0 ≠ 1)
W0, WEIGHTS = 0.1, [0.3, 0.3, 0.3]
MODELS = 1 + len(WEIGHTS)


def make_data(n: int, seed: int = 0) -> list[torch.Tensor]:
    """A bf16 base and fine-tunes that differ from it by small task vectors (as real fine-tunes do)."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(n, generator=g) * 0.02
    out = [base32.to(torch.bfloat16)]
    for _ in WEIGHTS:
        out.append((base32 + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16))
    return out


class Pool:
    """`threads` workers at one torch thread each (as `merging.Workers`); `map` sums their jobs' CPU time."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.cpu = 0.0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kscale",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn, items: list) -> list:
        def timed(x):
            c = time.thread_time()
            r = fn(x)
            return r, time.thread_time() - c

        results = list(self._pool.map(timed, items))
        self.cpu += sum(c for _, c in results)
        return [r for r, _ in results]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


#: a smaller Gram chunk, timed only: its float64 sums would give other λ bits (`kernels.CHUNK` is part
#: of them), but its buffers (4 × 256 KiB instead of 4 × 2 MiB) stay in a core's cache — does that pay
#: on many cores, where every worker's 8 MiB compete for the shared cache?
GRAM_TIMING_CHUNK = 1 << 15


def engine_kernel(pool: Pool, merge_chunk: int, gram_chunk: int = kernels.CHUNK) -> merging.FusedKernel:
    """The engine's FusedKernel with just the context its job functions read (device, chunks, run)."""
    ctx = SimpleNamespace(device=torch.device("cpu"), chunk=gram_chunk, merge_chunk=merge_chunk, run=pool.map)
    return merging.FusedKernel(ctx)  # type: ignore[arg-type]


TENSOR = SimpleNamespace(name="w", shared_rows=None, norm_group="g", floating=True)
PIECE = SimpleNamespace(rows=None, extra_rows=False)


def run_gram(pool: Pool, raws: list[dict], out: torch.Tensor, chunk: int = kernels.CHUNK) -> list:
    """FusedKernel.reduce: the Gram of the tensor over JOB spans on the pool, summed in job order."""
    return engine_kernel(pool, kernels.MERGE_CHUNK, chunk).reduce([TENSOR], raws, PIECE, lambda: raws[0])[0][2]


def run_weighted(pool: Pool, raws: list[dict], out: torch.Tensor, chunk: int) -> list[float]:
    """FusedKernel.tensor_jobs + run_job: w0·θ0 + Σ wt·θt into `out`; each job's output sum."""
    kernel = engine_kernel(pool, chunk)
    jobs = kernel.tensor_jobs(TENSOR, raws, PIECE, W0, WEIGHTS, out)  # type: ignore[arg-type]
    return pool.map(kernel.run_job, jobs)


def _spans(n: int) -> list[tuple[int, int]]:
    return merging.FusedKernel.spans(n)


def run_read(pool: Pool, raws: list[dict], out: torch.Tensor) -> list:
    """Reference: the largest 16-bit pattern of every input over the same JOB spans (reads what the
    kernels read, with almost no arithmetic: a bf16 `torch.sum` to float32 is itself compute-bound,
    ~1–2 GB/s a thread, slower than the kernels)."""
    flats = [r["w"].view(torch.int16) for r in raws]
    return pool.map(lambda s: [int(torch.amax(f[s[0]:s[1]])) for f in flats], _spans(out.numel()))


def run_copy(pool: Pool, raws: list[dict], out: torch.Tensor) -> list:
    """Reference: each input copied into the output over the same JOB spans (as many bytes written as read)."""
    flats = [r["w"] for r in raws]

    def job(s):
        for f in flats:
            out[s[0]:s[1]].copy_(f[s[0]:s[1]])

    return pool.map(job, _spans(out.numel()))


def measure(fn, pool: Pool, repeat: int) -> tuple[list[float], float, float, object]:
    """(walls, job CPU seconds per run, process CPU seconds per run, the last run's result)."""
    walls, result = [], None
    pool.cpu = 0.0
    p0 = time.process_time()
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(pool)
        walls.append(time.perf_counter() - t)
    return walls, pool.cpu / repeat, (time.process_time() - p0) / repeat, result


def thread_counts(given: str | None, cores: int | None = None) -> list[int]:
    """1, the most, the engine's own count of compute workers on this machine (`sizing.plan_workers`:
    12 on 16 cores), then the rest: the figures that matter most come first if the budget cuts the sweep."""
    from hf_metagpt.engine.sizing import plan_workers

    cores = cores or os.cpu_count() or 1
    if given:
        counts = sorted({int(x) for x in given.split(",")})
        return [counts[0]] + ([counts[-1]] if len(counts) > 1 else []) + counts[1:-1]
    engine = min(plan_workers(cores, 1 << 40, "cpu").compute, cores)
    counts = sorted({t for t in THREADS if t <= cores} | {min(cores, THREADS[-1]), engine})
    first = list(dict.fromkeys([1, counts[-1], engine]))
    return first + [t for t in counts if t not in first]


def sweep(args, data: list[torch.Tensor]) -> tuple[list[dict], dict, list[str], dict]:
    """Every (kernel, chunk, threads) row, the bit-identity checks, what the budget skipped, and the
    results themselves (the merged bytes' sha256, the Gram matrix)."""
    n = data[0].numel()
    raws = [{"w": t} for t in data]
    in_bytes = MODELS * n * data[0].element_size()
    chunks = [1 << b for b in args.chunk_bits]
    out = torch.empty(n, dtype=torch.bfloat16)
    ref_out = None
    ref: dict[tuple, object] = {}
    same = {"weighted_sum_outputs": True, "weighted_sum_job_sums": True, "gram": True}
    rows: list[dict] = []
    skipped: list[str] = []
    t0 = time.monotonic()
    for threads in thread_counts(args.threads):
        pool = Pool(threads)
        cases = [("read", None, run_read), ("copy", None, run_copy), ("gram", kernels.CHUNK, run_gram),
                 ("gram", GRAM_TIMING_CHUNK, lambda p, r, o: run_gram(p, r, o, GRAM_TIMING_CHUNK))]
        order = sorted(chunks, key=lambda c: c != kernels.MERGE_CHUNK)  # the default chunk first
        cases += [("weighted_sum", c, lambda p, r, o, c=c: run_weighted(p, r, o, c)) for c in order]
        for kernel, chunk, fn in cases:
            if args.budget and time.monotonic() - t0 > args.budget:
                skipped.append(f"{kernel} chunk={chunk} threads={threads}")
                continue
            walls, cpu, pcpu, result = measure(lambda p: fn(p, raws, out), pool, args.repeat)
            key = (kernel, chunk)
            if kernel == "gram":
                same["gram"] &= ref.setdefault(key, result) == result
            elif kernel == "weighted_sum":
                same["weighted_sum_job_sums"] &= ref.setdefault(key, result) == result
                if ref_out is None:
                    ref_out = out.clone()
                same["weighted_sum_outputs"] &= bool(torch.equal(out.view(torch.int16), ref_out.view(torch.int16)))
            wall = round(statistics.median(walls), 5)
            rows.append({"kernel": kernel, "chunk": chunk, "threads": threads, "wall_s": wall,
                         "walls": [round(w, 5) for w in walls], "in_GBps": round(in_bytes / wall / 1e9, 2),
                         "cpu_s": round(cpu, 3), "process_cpu_s": round(pcpu, 3)})
        pool.close()
    finish(rows)
    results = {"weighted_sum_sha256": None if ref_out is None else
               hashlib.sha256(ref_out.view(torch.uint8).numpy().tobytes()).hexdigest(),
               "gram": ref.get(("gram", kernels.CHUNK))}
    return rows, same, skipped, results


def finish(rows: list[dict]) -> None:
    """Speedup over the same kernel and chunk on the fewest threads; share of the read reference's GB/s."""
    for r in rows:
        one = min((x for x in rows if x["kernel"] == r["kernel"] and x["chunk"] == r["chunk"]),
                  key=lambda x: x["threads"])
        r["speedup"] = round(one["wall_s"] / r["wall_s"], 2) if one["threads"] == 1 else None
        read = next((x for x in rows if x["kernel"] == "read" and x["threads"] == r["threads"]), None)
        r["of_read"] = round(r["in_GBps"] / read["in_GBps"], 2) if read else None


def best_chunk(rows: list[dict]) -> dict | None:
    """The fastest merge chunk at the most threads measured, beside the default chunk's wall there."""
    ws = [r for r in rows if r["kernel"] == "weighted_sum"]
    if not ws:
        return None
    top = max(r["threads"] for r in ws)
    at = [r for r in ws if r["threads"] == top]
    fast = min(at, key=lambda r: r["wall_s"])
    default = next((r for r in at if r["chunk"] == kernels.MERGE_CHUNK), None)
    return {"threads": top, "chunk": fast["chunk"], "wall_s": fast["wall_s"],
            "default_chunk": kernels.MERGE_CHUNK, "default_wall_s": default["wall_s"] if default else None}


def table(report: dict) -> str:
    """The sweep as markdown: one row per (kernel, chunk, threads)."""
    m = report["machine"]
    lines = [f"### kernel scaling — {report['elements'] / 2**20:.0f} Mi elements × {MODELS} bf16 models "
             f"({report['in_bytes'] / 1e9:.2f} GB in), {m['cores']} cores, torch {m['torch']}, "
             f"load {m['load_at_start']}", "",
             "| kernel | chunk | threads | wall | GB/s in | speedup | CPU s | ÷ read GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["rows"], key=lambda r: (KINDS.index(r["kernel"]), r["chunk"] or 0, r["threads"])):
        chunk = f"2^{r['chunk'].bit_length() - 1}" if r["chunk"] else "—"
        lines.append(f"| {r['kernel']} | {chunk} | {r['threads']} | {r['wall_s'] * 1000:.0f} ms | {r['in_GBps']:.1f} "
                     f"| {_x(r['speedup'])} | {r['cpu_s']:.2f} | {_x(r['of_read'])} |")
    b = report["best"]
    notes = [f"threaded results bit-identical to 1 thread (merged bytes, job sums, Gram) and merged bytes the same "
             f"for every chunk: {'yes' if report['bit_identical'] else 'NO ' + json.dumps(report['identity'])}"]
    if b:
        notes.append(f"fastest merge chunk at {b['threads']} threads: 2^{b['chunk'].bit_length() - 1} "
                     f"({b['wall_s'] * 1000:.0f} ms; default 2^{b['default_chunk'].bit_length() - 1}: "
                     + (f"{b['default_wall_s'] * 1000:.0f} ms)" if b["default_wall_s"] else "not measured)"))
    notes.append(f"gram at 2^{GRAM_TIMING_CHUNK.bit_length() - 1}: timing only (its float64 sums give other λ bits; "
                 f"the engine's Gram chunk is 2^{kernels.CHUNK.bit_length() - 1})")
    if report["skipped"]:
        notes.append(f"skipped (budget): {len(report['skipped'])} rows")
    notes.append(f"sweep took {report['elapsed_s']:.1f} s")
    return "\n".join(lines + [""] + [f"- {x}" for x in notes]) + "\n"


KINDS = ["read", "copy", "gram", "weighted_sum"]


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=None, help=f"elements per model (default {DEFAULT_ELEMENTS})")
    p.add_argument("--small", action="store_true", help=f"{SMALL_ELEMENTS} elements per model (a quick check)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2,4,8,12,16 ≤ cores and the engine's count)")
    p.add_argument("--chunks", default=None, help="comma-separated merge chunk exponents (default 14..20)")
    p.add_argument("--repeat", type=int, default=3, help="runs per row (the median is reported)")
    p.add_argument("--budget", type=float, default=0.0, help="seconds for the sweep; rows after it are skipped")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    args.chunk_bits = [int(x) for x in args.chunks.split(",")] if args.chunks else list(CHUNK_BITS)
    n = args.elements or (SMALL_ELEMENTS if args.small else DEFAULT_ELEMENTS)
    t0 = time.monotonic()
    data = make_data(n)
    load = [round(x, 2) for x in os.getloadavg()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the calling thread only hands out jobs
    try:
        rows, same, skipped, results = sweep(args, data)
    finally:
        torch.set_num_threads(threads)
    report = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "load_at_start": load,
                          "load_at_end": [round(x, 2) for x in os.getloadavg()]},
              "elements": n, "models": MODELS, "dtype": "bfloat16", "in_bytes": MODELS * n * 2,
              "job": merging.JOB, "gram_chunk": kernels.CHUNK, "default_merge_chunk": kernels.MERGE_CHUNK,
              "repeat": args.repeat, "rows": rows, "identity": same, "bit_identical": all(same.values()),
              "best": best_chunk(rows), "skipped": skipped, "elapsed_s": round(time.monotonic() - t0, 1),
              "coefficients": {"w0": W0, "weights": WEIGHTS}, **results}
    text = table(report)
    report["table"] = text
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
