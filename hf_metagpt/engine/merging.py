"""Merge kernels: how a piece's tensors become norms and merged tensors — chosen once per merge.

Three kernels, picked by `choose_kernel` from the method and the kind of inputs, never by flags
inside the loop:

- `FusedKernel` — a weighted sum w0·θ0 + Σ wt·θt (MetaGPT, task arithmetic, linear) of full
  fine-tunes: chunked float64 kernels (`kernels.py`) on the raw stored bytes, in jobs shared by
  the compute threads; works on row slabs.
- `LowRankKernel` — the same weighted sums when every fine-tune is a plain LoRA adapter: the
  scaled base plus one stacked low-rank product per block of rows (float64), never a full τ.
- `MethodKernel` — everything else (TIES/DARE transforms, adapters with saved modules, mixed
  inputs, `--allow-nonfinite`): τ formed per whole tensor in float32 and handed to the method.

A kernel returns norms as (norm group, tensor, Gram matrix) records — G[i][j] = τi·τj in float64,
whose diagonal is the squared norms (bit for bit what the norm kernels gave before; the executor
adds them to the ledger in plan order) and whose rest says whether MetaGPT's orthogonality
assumption holds (`insight/`) — and merged tensors in the output dtype. Every merged tensor is checked: a NaN/Inf
names the input that holds it; a finite input that overflows the output dtype (bf16 → fp16)
stops the merge naming the tensor.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..errors import NonFiniteError, OutputError
from .gram import mixed_gram, task_gram
from ..methods import mergekit_order
from ..methods.base import MergeMethod, TensorContext
from ..safetensors_io import ST_TO_TORCH
from ..sources.architecture import num_layers
from . import kernels
from .pieces import Piece
from .plan import MergePlan, TensorPlan
from .sinks import Alloc, fresh
from .staging import Stager, device_view, span_bytes, spans, staging_enabled
from .fetch import FileProvider
from .tasks import AdapterSource, TaskSource, as_f32
from .timeline import Meter, clocks

#: Elements per job of the fused kernels: a tensor is cut into jobs so that both compute threads
#: share one large tensor too (a 3B MLP matrix, an embedding slab). A constant, not a function of
#: the core count, so the float64 norm sums are the same on every machine.
JOB = 1 << 22

#: (norm group, tensor, its Gram matrix τi·τj as T×T float64 values): the squared norms are the diagonal
Record = tuple[str, str, list[list[float]]]
Records = list[Record]
Raws = list  # [base tensors by name (or None: not read), then each source's], one piece


def check_finite(t: torch.Tensor, model: str, name: str, allow_nonfinite: bool) -> None:
    """Raise for NaN/Inf in an input, or zero them (treated as unchanged) with --allow-nonfinite."""
    if bool(torch.isfinite(t).all()):
        return
    if not allow_nonfinite:
        raise NonFiniteError(f"{model}: tensor {name!r} holds NaN or Inf values.",
                             hint="The checkpoint is damaged; pass --allow-nonfinite (allow_nonfinite=True) "
                                  "to treat those entries as unchanged from the base.")
    torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


class Workers:
    """The compute threads a kernel's jobs run on (`count` of them; 1: the calling thread).

    The kernel is built with them; the executor starts and stops them (it owns every thread).
    Each worker is single-threaded like the executor's thread: OpenMP's thread count is per
    thread, and a worker left at the default would split BLAS reductions (the norms) by the core
    count, so the same merge would differ in the last bits from machine to machine (or from one
    `accelerate launch` process, which torchrun gives one thread).
    """

    def __init__(self, count: int = 1) -> None:
        self.count = count
        self._pool: ThreadPoolExecutor | None = None
        #: time inside jobs, summed over the compute threads (`timeline`)
        self.busy = Meter()

    def start(self) -> None:
        if self.count > 1:
            self._pool = ThreadPoolExecutor(max_workers=self.count, thread_name_prefix="hf-metagpt-merge",
                                            initializer=torch.set_num_threads, initargs=(1,))

    def stop(self, *, cancel: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def map(self, fn: Callable, items: list) -> list:
        """fn over items, on the compute threads when there are several; results in input order."""
        busy = self.busy

        def timed(x):  # per job (millions of elements), never per chunk
            start = clocks()
            out = fn(x)
            busy.add_since(start)
            return out

        if self._pool is None or len(items) < 2:
            return [timed(x) for x in items]
        return list(self._pool.map(timed, items))


class Coefficients(Protocol):
    """What a kernel asks of the executor while merging: a group's coefficients, and (method path)
    the norms of a one-tensor group it reduced from the τ it formed."""

    def __call__(self, group: str) -> list[float]: ...

    def pending(self, group: str) -> bool: ...

    def settle(self, record: Record) -> None: ...


@dataclass(frozen=True)
class KernelContext:
    """Everything a kernel needs, fixed for the whole merge."""

    plan: MergePlan
    method: MergeMethod
    sources: tuple[TaskSource, ...]
    device: torch.device
    seed: int | None
    allow_nonfinite: bool
    #: the compute threads the kernel's jobs run on (started and stopped by the executor)
    workers: Workers
    #: the base's layer count as transformers reads its config (per-layer parameters)
    n_layers: int | None = None
    #: elements per chunk of the CPU weighted sum, from HF_METAGPT_MERGE_CHUNK (None: `kernels.MERGE_CHUNK`)
    cpu_merge_chunk: int | None = None

    def run(self, fn: Callable, items: list) -> list:
        """fn over items on the compute threads, results in input order."""
        return self.workers.map(fn, items)

    @property
    def chunk(self) -> int:
        """Elements per chunk of the Gram kernel (part of the λ's bits on the CPU: `kernels.CHUNK`)."""
        return kernels.CHUNK if self.device.type == "cpu" else kernels.CHUNK * 64

    @property
    def merge_chunk(self) -> int:
        """Elements per chunk of the weighted sum (elementwise: tuned freely, `kernels.MERGE_CHUNK`)."""
        if self.device.type == "cpu":
            return self.cpu_merge_chunk or kernels.MERGE_CHUNK
        return kernels.CHUNK * 64

    def tensor_context(self, tp: TensorPlan) -> TensorContext:
        """What the method may know of `tp`: name, seed and its layer (per-layer parameters)."""
        return TensorContext.of(tp.name, self.seed, self.n_layers)


class MergeKernel:
    """Shared parts: finiteness policy, flat views, extra vocabulary rows, output checks.

    What a kernel needs of the run it declares in class attributes, read by the executor and
    the schedule (never probed by type).
    """

    #: may merge row slabs of a tensor (the pieces may cut tensors)
    slabs = False
    #: releases the GIL in long loops: worth two single-threaded compute workers
    threaded = False
    #: what the weighted sums accumulate in (said on the card)
    precision = "float32"
    #: reducing norms inside a merge pass needs the base's weights (adapters' exact norms do not)
    reduce_reads_base = True
    #: pass 1 (norms only) reads the base with the piece; otherwise `reduce` reads it when it must
    pass1_reads_base = False
    #: reduces norms itself (`schedule`'s `fused`); otherwise a one-tensor norm group is reduced
    #: from the τ the merge forms (`Coefficients.settle`)
    fused = False
    #: merging reads the base's weights with the piece
    merge_reads_base = True
    #: copies each piece to the device on the feed's reader thread (`staging`; GPU only), or None
    stager: Stager | None = None

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        raise NotImplementedError

    def merge(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece, coefs: Coefficients,
              alloc: Alloc = fresh) -> list[torch.Tensor]:
        """The merged tensors (or row slabs) of a piece; `alloc` gives the memory of those it may carve."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers
    @property
    def one_torch_thread(self) -> bool:
        """Run with one OpenMP thread: the fused kernels work on cache-sized chunks, and splitting
        each over OpenMP threads costs more than it gains (measured 10-30x slower on a busy 2-core
        machine); the other core is better spent on the prefetch thread's reads."""
        # A GPU run issues the GPU's work from one thread; torch's CPU threads left at the core
        # count spin around every small host op (a 1.1B merge on 16 cores: 223 s of CPU in 29 s).
        return self.threaded and self.ctx.device.type == "cpu" or self.ctx.device.type != "cpu"

    def check_finite(self, t: torch.Tensor, model: str, name: str) -> None:
        """Raise for NaN/Inf in an input, or zero them (treated as unchanged) with --allow-nonfinite."""
        check_finite(t, model, name, self.ctx.allow_nonfinite)

    def name_nonfinite(self, tp: TensorPlan, raws: Raws, rows: int | None) -> None:
        """Raise for the first input whose copy of `tp` holds NaN/Inf (the slow check, on failure only)."""
        for info, raw in zip(self.ctx.plan.inputs, raws):
            if raw is None or tp.name not in raw:
                continue
            t = raw[tp.name]
            t = t[:rows] if rows is not None else t
            if not bool(torch.isfinite(t).all()):
                self.check_finite(t, info.name, tp.name)

    def check_output(self, tp: TensorPlan, out: torch.Tensor, raws: Raws, rows: int | None) -> None:
        """A merged tensor must be finite: name a non-finite input, else the overflow of the output dtype."""
        if not tp.floating or bool(torch.isfinite(out).all()):
            return
        if not self.ctx.allow_nonfinite:
            self.name_nonfinite(tp, raws, rows)
        raise OutputError(
            f"{tp.name}: merged values exceed the range of the output dtype {out.dtype} "
            f"(finite inputs, merged to ±Inf when rounded).",
            hint="Write a wider dtype: --dtype bfloat16 or --dtype float32 (dtype=...); float16 holds |x| ≤ 65504.")

    @staticmethod
    def flats(tp: TensorPlan, raws: Raws, slab: bool) -> list[torch.Tensor]:
        """Every input's copy of `tp` as a flat view, cut to the merged rows (a slab already is)."""
        rows = None if slab else tp.shared_rows
        return [kernels.flat(r[tp.name], rows) for r in raws]

    @staticmethod
    def spans(n: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + JOB, n)) for lo in range(0, n, JOB)] or [(0, 0)]

    def copied_rows(self, tp: TensorPlan, raws: Raws) -> torch.Tensor:
        """A slab of extra vocabulary rows, copied (and converted) from their source.

        A copy: the raw rows are views of a pooled buffer, and the write happens later on the
        writer thread."""
        return raws[tp.extra_source or 0][tp.name].to(self.ctx.device, ST_TO_TORCH[tp.out_dtype], copy=True)

    def with_extra_rows(self, tp: TensorPlan, merged: torch.Tensor, raws: Raws) -> torch.Tensor:
        """The merged shared rows of a whole tensor, followed by the extra rows of their source (if any)."""
        if tp.extra_source is None:
            return merged
        extra = raws[tp.extra_source][tp.name][tp.shared_rows:tp.out_shape[0]].to(self.ctx.device, merged.dtype)
        return torch.cat([merged, extra], dim=0)


class WeightedSumKernel(MergeKernel):
    """What the weighted-sum kernels share: their merge. Every floating tensor becomes w0·θ0 + Σ wt·θt
    in jobs on the compute threads (`tensor_jobs`, `run_job`: a subclass's arithmetic); integer
    buffers are copied from the base, copied vocabulary rows from their source; results are checked."""

    slabs = True
    threaded = True
    precision = "float64"
    fused = True

    def tensor_jobs(self, tp: TensorPlan, raws: Raws, piece: Piece, w0: float,
                    weights: list[float], out: torch.Tensor) -> list[tuple]:
        raise NotImplementedError

    def run_job(self, j: tuple) -> float:
        """Fill one job's part of an output; returns the sum of what it wrote (`kernels.finite_sum`)."""
        raise NotImplementedError

    def out_shape(self, tp: TensorPlan, raws: Raws, piece: Piece) -> torch.Size:
        """The merged tensor's (or row slab's) shape: the base's, cut to the shared vocabulary rows."""
        base = raws[0][tp.name]
        if piece.rows is not None or tp.shared_rows is None:
            return base.shape
        return torch.Size((tp.shared_rows, *base.shape[1:]))

    def merge(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece, coefs: Coefficients,
              alloc: Alloc = fresh) -> list[torch.Tensor]:
        """The merged tensors (or row slabs) of a piece, in memory from `alloc` (on the CPU).

        Each job sums what it wrote while it is in cache; only a tensor with a non-finite sum gets
        the exact (slow) check that names the input or the overflow.
        """
        slab = piece.rows is not None
        if piece.extra_rows:
            return [self.copied_rows(tp, raws) for tp in tensors]
        ctx = self.ctx
        if ctx.device.type != "cpu":
            alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=ctx.device)  # noqa: E731
        outs: list[torch.Tensor] = []
        jobs: list[tuple] = []
        owners: list[int] = []
        for k, tp in enumerate(tensors):
            if not tp.floating:
                # Integer buffers are copied from the base unchanged (copied: the raw tensor lives
                # in a pooled read buffer, and the write happens later on the writer thread).
                src = raws[0][tp.name]
                outs.append(alloc(src.shape, src.dtype).copy_(src))
                continue
            w0, weights = ctx.method.model_weights(coefs(tp.norm_group), ctx.tensor_context(tp))  # type: ignore[misc]
            out = alloc(self.out_shape(tp, raws, piece), ST_TO_TORCH[tp.out_dtype])
            tensor_jobs = self.tensor_jobs(tp, raws, piece, w0, weights, out)
            jobs += tensor_jobs
            owners += [k] * len(tensor_jobs)
            outs.append(out)
        sums = ctx.run(self.run_job, jobs)
        suspect = {k for k, total in zip(owners, sums) if not math.isfinite(total)}
        for k, tp in enumerate(tensors):
            if tp.floating:
                if k in suspect:
                    self.check_output(tp, outs[k], raws, None if slab else tp.shared_rows)
                if not slab:
                    outs[k] = self.with_extra_rows(tp, outs[k], raws)
        return outs


class FusedKernel(WeightedSumKernel):
    """Weighted sums of full fine-tunes with the fused chunked kernels (float64 accumulation)."""

    pass1_reads_base = True

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        """(θi − θ0)·(θj − θ0) of every pair of models for each tensor, fused, on the compute threads.

        Each tensor is cut into jobs of `JOB` elements (so both threads share one large tensor);
        a tensor's job sums are added in order. The diagonal is the chunked float64 sum of
        (θt − θ0)² over the same jobs bit for bit (`gram.task_gram`; tests/oracles.task_sq_norms).
        Non-finite inputs are named.
        """
        if piece.extra_rows:
            return []  # copied rows: no task vector
        slab = piece.rows is not None
        ctx = self.ctx
        flats = [self.flats(tp, raws, slab) for tp in tensors]
        jobs = [(k, lo, hi) for k, f in enumerate(flats) for lo, hi in self.spans(f[0].numel())]

        def job(j: tuple[int, int, int]) -> torch.Tensor:
            k, lo, hi = j
            f = flats[k]
            return task_gram(f[0][lo:hi], [m[lo:hi] for m in f[1:]], device=ctx.device, chunk=ctx.chunk)

        totals: list[torch.Tensor | None] = [None] * len(tensors)
        for (k, _, _), part in zip(jobs, ctx.run(job, jobs)):
            totals[k] = part if totals[k] is None else totals[k] + part  # type: ignore[operator]
        out: Records = []
        for tp, total in zip(tensors, totals):
            assert total is not None
            gram = total.tolist()  # one torch call per tensor (each gives up and takes back the GIL)
            if not all(math.isfinite(x) for row in gram for x in row):
                self.name_nonfinite(tp, raws, None if slab else tp.shared_rows)
            out.append((tp.norm_group, tp.name, gram))
        return out

    def tensor_jobs(self, tp: TensorPlan, raws: Raws, piece: Piece, w0: float,
                    weights: list[float], out: torch.Tensor) -> list[tuple]:
        """w0·θ0 + Σ wt·θt of one tensor (or row slab) into `out`: its element-range jobs."""
        f = self.flats(tp, raws, piece.rows is not None)
        return [(f, out.view(-1), w0, weights, lo, hi) for lo, hi in self.spans(out.numel())]

    def run_job(self, j: tuple) -> float:
        f, o, w0, weights, lo, hi = j
        total = torch.zeros((), dtype=torch.float64, device=o.device)
        kernels.weighted_models(f[0][lo:hi], [m[lo:hi] for m in f[1:]], w0, weights, o.dtype,
                                device=self.ctx.device, chunk=self.ctx.merge_chunk, out=o[lo:hi], out_sum=total)
        return float(total)


class GpuFusedKernel(FusedKernel):
    """`FusedKernel` on a GPU: big slabs, one upload per piece, one synchronisation per piece.

    Each input's part of the pooled read buffer goes to the GPU in one copy (the piece's tensors
    sit side by side in it); every tensor of the piece is then reduced or merged there in float64
    with the same arithmetic as the CPU kernels (`kernels.weighted_models`, `gram.task_gram`
    over the same `JOB` ranges, added in the same order), nothing read back until the piece is
    done: the Gram sums of all its tensors in one copy, the merged tensors straight into the
    output arena (CPU memory the sink writes from). Elementwise arithmetic is IEEE-exact on both
    devices, so merged values given the same λ are the same bytes; the float64 Gram sums add in
    the GPU's order (relative differences of ~1e-16 in λ, below a 16-bit output's rounding).
    """

    threaded = False  # one thread issues the GPU's work; the GPU is the parallel part
    #: elements per float64 buffer on the GPU (two buffers of 512 MiB at most)
    GPU_CHUNK = 1 << 26

    @property
    def one_torch_thread(self) -> bool:
        return True  # the host side of a GPU run: copies and bookkeeping

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        #: copies pieces to the device on the reader thread (`staging`; HF_METAGPT_GPU_STAGING=1)
        self.stager = Stager(ctx.device) if staging_enabled() else None

    def _upload(self, raws: Raws, names: Sequence[str]) -> Raws:
        """The piece's tensors on the GPU: staged by the reader thread (`staging`), else one copy
        per contiguous span of a pooled buffer now."""
        device = self.ctx.device
        stager = self.stager
        staged = [stager.lookup(raw) if stager is not None and raw is not None else None for raw in raws]
        todo = [raw for raw, found in zip(raws, staged) if found is None]
        gpu = {key: (span_bytes(st, lo, hi).to(device), lo) for key, (st, lo, hi) in spans(todo, names).items()}
        out: Raws = []
        for raw, found in zip(raws, staged):
            if raw is None:
                out.append(None)
                continue
            moved = {}
            for name in names:
                t = raw[name]
                g = device_view(t, found if found is not None else gpu)
                moved[name] = g if g is not None else t.to(device)
            out.append(moved)
        return out

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        if piece.extra_rows:
            return []
        slab = piece.rows is not None
        ctx = self.ctx
        graws = self._upload(raws, [tp.name for tp in tensors])
        totals = []
        for tp in tensors:
            f = self.flats(tp, graws, slab)
            total = None
            for lo, hi in self.spans(f[0].numel()):
                part = task_gram(f[0][lo:hi], [m[lo:hi] for m in f[1:]], device=ctx.device, chunk=ctx.chunk)
                total = part if total is None else total + part
            totals.append(total)
        host = torch.stack(totals).cpu() if totals else []  # the piece's one synchronisation
        out: Records = []
        for tp, total in zip(tensors, host):
            if not bool(torch.isfinite(total).all()):
                self.name_nonfinite(tp, raws, None if slab else tp.shared_rows)
            out.append((tp.norm_group, tp.name, total.tolist()))
        return out

    def copied_rows(self, tp: TensorPlan, raws: Raws) -> torch.Tensor:
        return raws[tp.extra_source or 0][tp.name].to("cpu", ST_TO_TORCH[tp.out_dtype], copy=True)

    def with_extra_rows(self, tp: TensorPlan, merged: torch.Tensor, raws: Raws) -> torch.Tensor:
        if tp.extra_source is None:
            return merged
        extra = raws[tp.extra_source][tp.name][tp.shared_rows:tp.out_shape[0]].to(merged.dtype)
        return torch.cat([merged, extra], dim=0)

    def merge(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece, coefs: Coefficients,
              alloc: Alloc = fresh) -> list[torch.Tensor]:
        slab = piece.rows is not None
        if piece.extra_rows:
            return [self.copied_rows(tp, raws) for tp in tensors]
        ctx = self.ctx
        floating = [tp for tp in tensors if tp.floating]
        graws = self._upload(raws, [tp.name for tp in floating])
        outs: list[torch.Tensor] = []
        done: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for k, tp in enumerate(tensors):
            if not tp.floating:
                src = raws[0][tp.name]
                outs.append(alloc(src.shape, src.dtype).copy_(src))
                continue
            w0, weights = ctx.method.model_weights(coefs(tp.norm_group), ctx.tensor_context(tp))  # type: ignore[misc]
            f = self.flats(tp, graws, slab)
            shape = self.out_shape(tp, raws, piece)
            gout = torch.empty(shape, dtype=ST_TO_TORCH[tp.out_dtype], device=ctx.device)
            total = torch.zeros((), dtype=torch.float64, device=ctx.device)
            kernels.weighted_models(f[0], f[1:], w0, weights, gout.dtype, device=ctx.device, chunk=self.GPU_CHUNK,
                                    out=gout.view(-1), out_sum=total)
            done.append((k, gout, total))
            outs.append(gout)
        sums = torch.stack([t for _, _, t in done]).cpu().tolist() if done else []
        # Staged (`staging`): the arena is page-locked, so the copies back run without blocking,
        # one after the other on the compute stream, and the piece waits for them once.
        queued = self.stager is not None
        hosts = []
        for k, gout, _ in done:
            host = alloc(gout.shape, gout.dtype)
            host.copy_(gout, non_blocking=queued)
            hosts.append(host)
        if queued and ctx.device.type == "cuda":
            torch.cuda.current_stream(ctx.device).synchronize()  # the writer reads them next
        for (k, _, _), host, total in zip(done, hosts, sums):
            outs[k] = host
            tp = tensors[k]
            if not math.isfinite(total):
                self.check_output(tp, host, raws, None if slab else tp.shared_rows)
            if not slab:
                outs[k] = self.with_extra_rows(tp, host, raws)
        return outs


class LowRankKernel(WeightedSumKernel):
    """Weighted sums when every fine-tune is a plain LoRA adapter (no full-size τ ever formed)."""

    reduce_reads_base = False

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        if piece.extra_rows or (piece.rows is not None and piece.rows[0] > 0):
            # Adapters' exact norms (from their factors) are the whole tensor's, so they are
            # counted with its first slab only.
            return []
        out: Records = []
        for tp in tensors:
            # From the factors: ⟨BiAi, BjAj⟩ exactly, never a full-size Δ.
            exact = [src.exact_part(tp, raw) for src, raw in zip(self.ctx.sources, raws[1:])]
            assert all(e is not None for e in exact), tp.name
            gram = mixed_gram([None if isinstance(e, float) else e for e in exact])
            out.append((tp.norm_group, tp.name, gram.tolist()))
        return out

    def tensor_jobs(self, tp: TensorPlan, raws: Raws, piece: Piece, w0: float,
                    weights: list[float], out: torch.Tensor) -> list[tuple]:
        """w0·θ0 + Σt wt·(θ0 + st·Bt·At) = (w0 + Σ wt)·θ0 + [w1·s1·B1 | w2·s2·B2 | ...]·[A1; A2; ...]:
        one stacked product of rank Σr per block of rows, in float64 (see `kernels.base_plus_lowrank`).
        """
        slab = piece.rows is not None
        base = raws[0][tp.name]
        if not slab and tp.shared_rows is not None:
            base = base[: tp.shared_rows]
        lo = piece.rows[0] if slab else 0  # type: ignore[index]
        stacked = self._stacked(tp, raws, weights, lo, base.shape[0])
        cols = max(1, base[0].numel()) if base.dim() else 1
        step = max(1, JOB // cols)
        c0 = w0 + sum(weights)
        return [(base, stacked, c0, out, r, min(r + step, base.shape[0])) for r in range(0, base.shape[0], step)]

    def run_job(self, j: tuple) -> float:
        base, stacked, c0, out, r0, r1 = j
        kernels.base_plus_lowrank(base[r0:r1], [(b[r0:r1], a) if not t else (b, a[:, r0:r1]) for b, a, t in stacked],
                                  [t for _, _, t in stacked], c0, out=out[r0:r1])
        return float(kernels.finite_sum(out[r0:r1]))

    def _stacked(self, tp: TensorPlan, raws: Raws, weights: list[float], lo: int, rows: int) -> list[tuple]:
        """Scaled B factors side by side and A factors stacked, per orientation, for rows [lo, lo+rows)."""
        parts: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for w, src, raw in zip(weights, self.ctx.sources, raws[1:]):
            if w == 0.0 or tp.name not in src.info.lora:  # type: ignore[attr-defined]
                continue
            b, a, m = src.factors(tp, raw, torch.float64, self.ctx.device)  # type: ignore[attr-defined]
            # This piece's rows of Δ: rows of B, or columns of A when Δ = (B·A)ᵀ.
            if m.transposed:
                a = a[:, lo: lo + rows]
            else:
                b = b[lo: lo + rows]
            bs, as_ = parts.setdefault(m.transposed, ([], []))
            bs.append(b * (w * m.scale))
            as_.append(a)
        return [(torch.cat(bs, dim=1), torch.cat(as_, dim=0), t) for t, (bs, as_) in parts.items()]


class MethodKernel(MergeKernel):
    """τ per whole tensor in float32, through the method's own functions (TIES, DARE, adapters, ...)."""

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        # A method that rewrites task vectors (DARE, TIES) needs the norms of the rewritten ones,
        # so exact adapter norms apply only when it leaves them as they are.
        self.transforms = transforms(ctx.method)
        if ctx.method.mergekit_order:
            # said on the card and in the summary: "mergekit bfloat16" (auto: the inputs' dtype)
            self.precision = f"mergekit {ctx.method.mergekit_order}"

    def task_vectors(self, tp: TensorPlan, raws: Raws) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ctx = self.ctx
        base = as_f32(raws[0][tp.name], tp.shared_rows, ctx.device)
        self.check_finite(base, ctx.plan.base.name, tp.name)
        taus = []
        for src, raw in zip(ctx.sources, raws[1:]):
            tau = src.task_vector(tp, raw, base)
            self.check_finite(tau, src.info.name, tp.name)
            taus.append(tau)
        return base, ctx.method.transform(taus, ctx.tensor_context(tp))

    def _exact(self, tp: TensorPlan, raws: Raws) -> list:
        """Each model's τ where known without forming it (LoRA factors, 0.0 untouched), else None."""
        if self.transforms:
            return [None] * len(self.ctx.sources)
        return [src.exact_part(tp, raw) for src, raw in zip(self.ctx.sources, raws[1:])]

    def record(self, tp: TensorPlan, exact: list, taus: list[torch.Tensor] | None) -> Record:
        """The tensor's Gram matrix: factors where exact, formed τ elsewhere (diagonal: the norms as
        before, `squared_norm(τ)` or the factors' exact ‖s·B·A‖²)."""
        parts = [None if isinstance(e, float) else e if e is not None else taus[i]  # type: ignore[index]
                 for i, e in enumerate(exact)]
        return (tp.norm_group, tp.name, mixed_gram(parts).tolist())

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        out: Records = []
        for tp in tensors:
            exact = self._exact(tp, raws)
            taus = None
            if any(e is None for e in exact):
                if raws[0] is None:  # read lazily: adapters' exact norms need no base weights
                    raws[0] = read_base()
                _, taus = self.task_vectors(tp, raws)
            out.append(self.record(tp, exact, taus))
        return out

    def merge(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece, coefs: Coefficients,
              alloc: Alloc = fresh) -> list[torch.Tensor]:
        return self.ctx.run(lambda tp: self.merge_tensor(tp, raws, coefs), list(tensors))

    def merge_models(self, tp: TensorPlan, raws: Raws) -> torch.Tensor:
        """mergekit's arithmetic (`methods/mergekit_order.py`): base and models cast to the method's
        compute dtype, as mergekit casts what it loads, and merged step by step in it."""
        ctx = self.ctx
        stored = [r[tp.name].dtype for r in raws if r is not None and tp.name in r]
        dtype = mergekit_order.compute_dtype(ctx.method, stored)
        base = as_f32(raws[0][tp.name], tp.shared_rows, ctx.device)
        self.check_finite(base, ctx.plan.base.name, tp.name)
        models = [t.to(dtype) for t in _models_f32(self, tp, raws, base)]
        merged = mergekit_order.merge(ctx.method, base.to(dtype), models, ctx.tensor_context(tp))
        merged = merged.to(ST_TO_TORCH[tp.out_dtype])
        self.check_output(tp, merged, raws, tp.shared_rows)
        return self.with_extra_rows(tp, merged, raws)

    def merge_tensor(self, tp: TensorPlan, raws: Raws, coefs: Coefficients) -> torch.Tensor:
        """One merged tensor (a one-tensor norm group not yet known is reduced from its τ first)."""
        if not tp.floating:
            # Integer buffers are copied from the base unchanged (cloned: the raw tensor lives in a
            # pooled read buffer, and the write happens later on the writer thread).
            return raws[0][tp.name].clone()
        ctx = self.ctx
        if ctx.method.mergekit_order:
            return self.merge_models(tp, raws)
        base, taus = self.task_vectors(tp, raws)
        if ctx.method.uses_group_norms and coefs.pending(tp.norm_group):
            coefs.settle(self.record(tp, self._exact(tp, raws), taus))
        merged = ctx.method.combine(base, taus, coefs(tp.norm_group), ctx.tensor_context(tp)).to(ST_TO_TORCH[tp.out_dtype])
        self.check_output(tp, merged, raws, tp.shared_rows)
        return self.with_extra_rows(tp, merged, raws)


def _models_f32(kernel: "MethodKernel", tp: TensorPlan, raws: Raws, base: torch.Tensor) -> list[torch.Tensor]:
    """Every fine-tune's θt of `tp` in float32 (a LoRA adapter's as θ0 + Δ, `base` in float32), each checked."""
    ctx = kernel.ctx
    out = []
    for src, raw in zip(ctx.sources, raws[1:]):
        if src.pooled:
            t = as_f32(raw[tp.name], tp.shared_rows, ctx.device)
        else:
            t = src.task_vector(tp, raw, base).add_(base)
        kernel.check_finite(t, src.info.name, tp.name)
        out.append(t)
    return out


def transforms(method: MergeMethod) -> bool:
    """Whether a method rewrites task vectors (so norms must be taken from the rewritten ones)."""
    return type(method).transform is not MergeMethod.transform


def choose_kernel(method: MergeMethod, sources: Sequence[TaskSource], allow_nonfinite: bool) -> type[MergeKernel]:
    """The kernel for this merge, from the method and the kinds of inputs."""
    # Weighted sums (MetaGPT, task arithmetic, linear) can be fused; TIES/DARE transforms and
    # --allow-nonfinite (which must look at each input's values) go through the method.
    weighted = (not transforms(method) and not allow_nonfinite
                and method.model_weights([0.0] * len(sources)) is not None)
    if weighted and all(s.pooled for s in sources):
        return FusedKernel
    # Adapters that replace whole tensors (modules_to_save) take the method's functions.
    if weighted and all(not s.pooled for s in sources) and not any(s.saves_whole_tensors for s in sources):
        return LowRankKernel
    return MethodKernel


def sources_of(plan: MergePlan, files: FileProvider, device: torch.device, *,
               allow_nonfinite: bool = False) -> tuple[TaskSource, ...]:
    """Every fine-tune of the plan as the engine reads it (an adapter as `AdapterSource`)."""
    def check(t: torch.Tensor, model: str, name: str) -> None:
        check_finite(t, model, name, allow_nonfinite)

    return tuple((AdapterSource if info.ref.is_adapter else TaskSource)(info, i, files, device, check)
                 for i, info in enumerate(plan.models, 1))


def build_kernel(plan: MergePlan, method: MergeMethod, sources: Sequence[TaskSource], device: torch.device, *,
                 seed: int | None = None, allow_nonfinite: bool = False, processes: int = 1) -> MergeKernel:
    """The kernel for this merge (`choose_kernel`) with its compute threads (`compute_workers`; not started)."""
    cls = choose_kernel(method, sources, allow_nonfinite)
    if cls is FusedKernel and device.type != "cpu":
        cls = GpuFusedKernel
    from .sizing import merge_chunk_override

    workers = Workers(compute_workers(cls, device, processes))
    return cls(KernelContext(plan, method, tuple(sources), device, seed, allow_nonfinite, workers,
                             num_layers(plan.base.config), merge_chunk_override()))


def compute_workers(kernel: type[MergeKernel], device: torch.device, processes: int = 1) -> int:
    """Compute threads of this merge process (`sizing.plan_workers`: the cores, free memory, the
    device, and `--workers` / HF_METAGPT_WORKERS)."""
    from .sizing import env_override, free_memory, plan_workers

    return plan_workers(os.cpu_count() or 1, free_memory(), device.type, env_override(),
                        threaded=kernel.threaded, processes=processes).compute
