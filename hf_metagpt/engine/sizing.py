"""How many threads a merge uses, from what the machine has: a pure function and its override.

`plan_workers(cores, free_bytes, device, override)` gives the readers, compute workers and
writers of one merge process, and how many OpenMP threads torch may use on the calling thread:

- CPU, a kernel whose jobs release the GIL (the fused weighted sums): one compute worker per core
  left after the reader (two on two cores, as measured best there), at most `MAX_COMPUTE`, and no
  more than free memory holds (`WORKER_BYTES` of float64 chunk buffers each);
- GPU: one thread issues the kernels (the GPU is the parallel part) and torch's CPU threads are
  bounded to `GPU_TORCH_THREADS` (1): left at the core count they spin in OpenMP barriers around every
  small host op (a 1.1B merge on 16 cores burnt 223 s of CPU in 29 s);
- the method path (TIES, DARE, SLERP, ...: whole-tensor torch ops): one compute thread, torch's
  own threads for its ops.

`--workers N` / `HF_METAGPT_WORKERS=N` sets the compute workers (for a shared machine: 1 keeps a
merge on about one core). The bytes never depend on any of these counts: jobs have fixed element
ranges and their sums are combined in job order (`merging.FusedKernel.reduce`), each worker runs
torch single-threaded, and the method path's reductions run single-threaded (`methods.sparsify.host`).

`HF_METAGPT_MERGE_CHUNK` sizes the other knob of the CPU weighted sum: elements per chunk
(`kernels.MERGE_CHUNK` by default; `bench/kernel_scaling.py` measures which is fastest on a machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..constants import MERGE_CHUNK_ENV, WORKERS_ENV, env
from ..errors import MergeError

#: compute workers at most (memory bandwidth, not cores, bounds a merge well before this)
MAX_COMPUTE = 32
#: memory one compute worker needs besides the pooled pieces (its float64 chunk buffers), with margin
WORKER_BYTES = 64 << 20
#: threads reading a piece's inputs side by side at most
MAX_READERS = 4
#: torch's intra-op threads on the calling thread of a GPU run
GPU_TORCH_THREADS = 1


@dataclass(frozen=True)
class WorkerPlan:
    """Threads of one merge process."""

    readers: int
    compute: int
    writers: int
    #: OpenMP threads torch may use on the merging thread (None: leave torch's setting)
    torch_threads: int | None
    #: "auto" (from the machine) or "override" (`--workers` / HF_METAGPT_WORKERS)
    source: str


def parse_override(value: str | int | None, what: str = WORKERS_ENV) -> int | None:
    """A positive worker count, or None when not given; a MergeError naming the setting otherwise."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() not in (str(n), f"+{n}"):
        raise MergeError(f"{what}={value!r}: the number of compute workers must be a whole number ≥ 1.",
                         hint=f"Use e.g. --workers 4 or {WORKERS_ENV}=4 (1 keeps a merge on about one core).")
    return n


def env_override() -> int | None:
    return parse_override(env(WORKERS_ENV))


#: the powers of two `HF_METAGPT_MERGE_CHUNK` may take (elements: 32 KiB to 128 MiB of float64 buffer)
MERGE_CHUNK_BITS = range(12, 25)


def parse_merge_chunk(value: str | None) -> int | None:
    """Elements per chunk of the CPU weighted sum from `HF_METAGPT_MERGE_CHUNK`, or None when not given.

    A power of two from 2^12 to 2^24, as a number (``65536``) or as ``2^16``; a MergeError naming
    the setting otherwise. Elementwise arithmetic: the value changes the speed, never the bytes.
    """
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    try:
        n = 1 << int(text[2:]) if text.startswith("2^") else int(text)
    except (ValueError, OverflowError):
        n = 0
    if n < 1 or n & (n - 1) or n.bit_length() - 1 not in MERGE_CHUNK_BITS:
        lo, hi = MERGE_CHUNK_BITS[0], MERGE_CHUNK_BITS[-1]
        raise MergeError(f"{MERGE_CHUNK_ENV}={value!r}: the chunk of the weighted sum must be a power of two "
                         f"from 2^{lo} ({1 << lo}) to 2^{hi} ({1 << hi}) elements.",
                         hint=f"Use e.g. {MERGE_CHUNK_ENV}=65536 (or 2^16), or unset it for the default "
                              f"(bench/kernel_scaling.py measures which chunk is fastest on this machine).")
    return n


def merge_chunk_override() -> int | None:
    """`HF_METAGPT_MERGE_CHUNK` (read once per merge, by `merging.build_kernel`), None when unset."""
    return parse_merge_chunk(env(MERGE_CHUNK_ENV))


def plan_workers(cores: int, free_bytes: int, device: str, override: int | None = None, *,
                 threaded: bool = True, processes: int = 1) -> WorkerPlan:
    """The threads of one merge process on a machine with `cores` cores and `free_bytes` of free memory.

    `device` is "cpu" or a GPU type ("cuda"); `threaded`: the kernel's jobs release the GIL (worth
    several compute workers); `processes`: merge processes sharing the machine (`--num-processes`).
    """
    cores = max(1, cores)
    mine = max(1, cores // max(1, processes))
    # Readers: one per input of a piece (base + 3 fine-tunes: 4) on machines with cores to spare;
    # a warm read is a copy out of the page cache at a few GB/s per thread.
    reading = 1 if mine < 8 else min(MAX_READERS, mine // 4)
    if device != "cpu":
        threads = max(1, min(GPU_TORCH_THREADS, mine))
        return WorkerPlan(readers=reading, compute=1, writers=1, torch_threads=threads,
                          source="override" if override else "auto")
    if override is not None:
        return WorkerPlan(readers=1, compute=override if threaded else 1, writers=1,
                          torch_threads=1 if threaded else None, source="override")
    if not threaded:
        return WorkerPlan(readers=reading, compute=1, writers=1, torch_threads=None, source="auto")
    if mine < 2:
        compute = 1
    elif mine < 4:
        compute = 2  # two cores: two workers and the reader share them (measured best on 2 cores)
    else:
        compute = mine - reading  # the rest after the readers (the writer mostly waits on the disk)
    compute = max(1, min(compute, MAX_COMPUTE, free_bytes // WORKER_BYTES or 1))
    return WorkerPlan(readers=reading, compute=compute, writers=1, torch_threads=1, source="auto")


def readers(device: "object", processes: int = 1) -> int:
    """Reader threads of this merge process (`plan_workers`'s; 1 under `--workers` / HF_METAGPT_WORKERS)."""
    kind = getattr(device, "type", device)
    return plan_workers(os.cpu_count() or 1, free_memory(), str(kind), env_override(), processes=processes).readers


def free_memory() -> int:
    """Bytes of memory available now (MemAvailable), or a large number when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 — no psutil, or no /proc
        return 1 << 40
