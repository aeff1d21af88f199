"""Stream a plan: read one piece of every model, hand tensors to the method, write shards.

Memory stays at about two pieces of all inputs (`pieces`: a transformer block when it fits the
unit budget, else some of its tensors or a row slab of one) plus the merged tensors of one
piece: pieces are read, merged and written one after another, and shard bytes go to disk as soon
as each tensor is merged (`ShardWriter`).

The paper's whole-model λ needs every norm before the first tensor is written, so such plans run
two passes: pass 1 only reduces squared norms, pass 2 merges. Norm groups inside one stream
group (layer/tensor granularity) are reduced and applied in the same pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import NonFiniteError
from ..methods.base import MergeMethod, TensorContext, squared_norm
from ..safetensors_io import ST_TO_TORCH, TensorMeta
from ..sources.model import ModelInfo
from . import kernels
from .fetch import FileProvider, LocalFiles
from .pieces import Piece, piece_bytes, piece_metas, split_group, unit_bytes
from .plan import MergePlan, StreamGroup, TensorPlan
from .reader import BufferPool
from .stats import StreamStats
from .tasks import TaskSource, _f32, read_metas
from .workdir import NORM_STATE, NORM_STATES
from .writer import _ShardSink, finished_shards

if TYPE_CHECKING:
    from .distributed import Share

log = logging.getLogger(__name__)

#: Elements per job of the fused kernels: a tensor is cut into jobs so that both compute threads
#: share one large tensor too (a 3B MLP matrix, an embedding slab). A constant, not a function of
#: the core count, so the float64 norm sums are the same on every machine.
JOB = 1 << 22


@dataclass
class NormState:
    """Squared norms per norm group and model, and which groups are complete."""

    n_models: int
    sq: dict[str, list[float]] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)

    def add(self, group: str, values: list[float]) -> None:
        acc = self.sq.setdefault(group, [0.0] * self.n_models)
        for i, v in enumerate(values):
            acc[i] += v


class _NormLog(NormState):
    """Records each `add` instead of summing (pass 1 of a multi-process merge)."""

    def __init__(self, n_models: int) -> None:
        super().__init__(n_models)
        self.entries: list[tuple[str, list[float]]] = []

    def add(self, group: str, values: list[float]) -> None:
        self.entries.append((group, [float(v) for v in values]))


class Merger:
    """Runs a `MergePlan` with a `MergeMethod` into a work folder."""

    def __init__(self, plan: MergePlan, method: MergeMethod, work_dir: Path, *, device: torch.device,
                 files: FileProvider | None = None, seed: int | None = None, allow_nonfinite: bool = False,
                 progress: bool = True, group_filter: Callable[[StreamGroup], bool] | None = None,
                 share: "Share | None" = None) -> None:
        self.plan = plan
        self.method = method
        self.work_dir = work_dir
        self.device = device
        self.files = files or LocalFiles()
        self.seed = seed
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress
        self.group_filter = group_filter
        self.share = share  # this process's part of a multi-process merge (`distributed`); None: all of it
        self.norms = NormState(len(plan.models))
        self.coefficients: dict[str, list[float]] = {}
        self.stats = StreamStats()
        self.sources = [self._source(info, i) for i, info in enumerate(plan.models, 1)]
        # A method that rewrites task vectors (DARE, TIES) needs the norms of the rewritten ones,
        # so exact adapter norms apply only when it leaves them as they are.
        self.transforms = type(method).transform is not MergeMethod.transform
        # Weighted sums of full fine-tunes (MetaGPT, task arithmetic, linear) take the fused
        # chunked kernels; everything else (DARE/TIES transforms, adapters, --allow-nonfinite)
        # goes through the method's own whole-tensor functions.
        weighted = (not self.transforms and not allow_nonfinite
                    and method.model_weights([0.0] * len(self.sources)) is not None)
        self.fast = weighted and all(s.pooled for s in self.sources)
        # The same weighted sums when every fine-tune is a plain LoRA adapter: θ0 scaled plus one
        # stacked low-rank product per row block (`kernels.base_plus_lowrank`), never a full-size τ.
        # Adapters that replace whole tensors (modules_to_save) take the method's functions.
        self.lowrank = (weighted and not self.fast and all(not s.pooled for s in self.sources)
                        and not any(getattr(s.info, "full", None) for s in self.sources))
        self.chunk = kernels.CHUNK if device.type == "cpu" else kernels.CHUNK * 64
        # The fused kernels release the GIL: on a CPU with cores to spare, the tensors of a group
        # are merged on two threads (each single-threaded), in order of the plan when gathered.
        self.workers = 2 if (self.fast or self.lowrank) and device.type == "cpu" and (os.cpu_count() or 1) > 1 else 1
        if share is not None and share.count >= (os.cpu_count() or 1):
            self.workers = 1  # the other processes use the cores
        self._compute: ThreadPoolExecutor | None = None
        self.unit = unit_bytes()
        self.pool = BufferPool(slots=2, keep=self.unit)  # one piece in use, the next one being read

    def _source(self, info: ModelInfo, index: int) -> TaskSource:
        if info.ref.is_adapter:
            from .tasks import AdapterSource

            return AdapterSource(info, index, self.files, self.device, self._check_finite)
        return TaskSource(info, index, self.files, self.device, self._check_finite)

    # -------------------------------------------------------------- tensor math around the method
    def _task_vectors(self, tp: TensorPlan, raws: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = _f32(raws[0][tp.name], tp.shared_rows, self.device)
        self._check_finite(base, self.plan.base.name, tp.name)
        taus = []
        for src, raw in zip(self.sources, raws[1:]):
            tau = src.task_vector(tp, raw, base)
            self._check_finite(tau, src.info.name, tp.name)
            taus.append(tau)
        return base, self.method.transform(taus, self._ctx(tp))

    def _ctx(self, tp: TensorPlan) -> TensorContext:
        """What the method may know of `tp`: name, seed, and its layer (per-layer parameters)."""
        return TensorContext.of(tp.name, self.seed, self.plan.base.config.get("num_hidden_layers"))

    def _exact_norms(self, tp: TensorPlan, raws: list) -> list[float | None]:
        if self.transforms:
            return [None] * len(self.sources)
        return [src.exact_sq_norm(tp, raw) for src, raw in zip(self.sources, raws[1:])]

    def _sq_norms(self, tp: TensorPlan, raws: list, taus: list[torch.Tensor]) -> list[float]:
        return [squared_norm(t) if e is None else e for e, t in zip(self._exact_norms(tp, raws), taus)]

    def _check_finite(self, t: torch.Tensor, model: str, name: str) -> None:
        if bool(torch.isfinite(t).all()):
            return
        if not self.allow_nonfinite:
            raise NonFiniteError(f"{model}: tensor {name!r} holds NaN or Inf values.",
                                 hint="The checkpoint is damaged; pass --allow-nonfinite to treat those entries as unchanged from the base.")
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)

    def _flats(self, tp: TensorPlan, raws: list, slab: bool) -> list[torch.Tensor]:
        """Every input's copy of `tp` as a flat view, cut to the merged rows (a slab already is)."""
        rows = None if slab else tp.shared_rows
        return [kernels.flat(r[tp.name], rows) for r in raws]

    @staticmethod
    def _spans(n: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + JOB, n)) for lo in range(0, n, JOB)] or [(0, 0)]

    def _fast_norms(self, tensors: list[TensorPlan], raws: list, slab: bool) -> list[list[float]]:
        """‖θt − θ0‖² of every model for each tensor, with the fused kernel on the compute threads.

        Each tensor is cut into jobs of `JOB` elements (so both threads share one large tensor);
        a tensor's job sums are added in order. Non-finite inputs are named.
        """
        flats = [self._flats(tp, raws, slab) for tp in tensors]
        jobs = [(k, lo, hi) for k, f in enumerate(flats) for lo, hi in self._spans(f[0].numel())]

        def job(j: tuple[int, int, int]) -> torch.Tensor:
            k, lo, hi = j
            f = flats[k]
            return kernels.task_sq_norms(f[0][lo:hi], [m[lo:hi] for m in f[1:]], device=self.device, chunk=self.chunk)

        totals: list[torch.Tensor | None] = [None] * len(tensors)
        for (k, _, _), part in zip(jobs, self._map(job, jobs)):
            totals[k] = part if totals[k] is None else totals[k] + part  # type: ignore[operator]
        out = []
        for tp, total in zip(tensors, totals):
            assert total is not None
            if not bool(torch.isfinite(total).all()):
                self._name_nonfinite(tp, raws, None if slab else tp.shared_rows)
            out.append(total.tolist())
        return out

    def _fast_merge(self, tensors: list[TensorPlan], raws: list, piece: Piece) -> list[torch.Tensor]:
        """The merged tensors (or row slabs) of a piece: w0·θ0 + Σ wt·θt in jobs on the compute threads.

        Every norm group is complete by now (reduced in pass 1, a reduce-only step, or this step).
        """
        slab = piece.rows is not None
        if piece.extra_rows:
            return [self._copied_rows(tp, raws) for tp in tensors]
        outs: list[torch.Tensor] = []
        jobs: list[tuple[list[torch.Tensor], torch.Tensor, float, list[float], int, int]] = []
        for tp in tensors:
            if not tp.floating:
                # Integer buffers are copied from the base unchanged (cloned: the raw tensor lives
                # in a pooled read buffer, and the write happens later on the writer thread).
                outs.append(raws[0][tp.name].clone())
                continue
            assert not self.method.uses_group_norms or tp.norm_group in self.norms.complete, tp.name
            w0, weights = self.method.model_weights(self._coefficients(tp.norm_group), self._ctx(tp))  # type: ignore[misc]
            f = self._flats(tp, raws, slab)
            base = raws[0][tp.name]
            shape = base.shape if slab or tp.shared_rows is None else (tp.shared_rows, *base.shape[1:])
            out = torch.empty(shape, dtype=ST_TO_TORCH[tp.out_dtype], device=self.device)
            jobs += [(f, out.view(-1), w0, weights, lo, hi) for lo, hi in self._spans(out.numel())]
            outs.append(out)

        def job(j: tuple) -> None:
            f, o, w0, weights, lo, hi = j
            kernels.weighted_models(f[0][lo:hi], [m[lo:hi] for m in f[1:]], w0, weights, o.dtype,
                                    device=self.device, chunk=self.chunk, out=o[lo:hi])

        self._map(job, jobs)
        for k, tp in enumerate(tensors):
            if not tp.floating:
                continue
            if not self.method.uses_group_norms and not bool(torch.isfinite(outs[k]).all()):
                self._name_nonfinite(tp, raws, None if slab else tp.shared_rows)  # never looked at the inputs
            if not slab:
                outs[k] = self._with_extra_rows(tp, outs[k], raws)
        return outs

    def _copied_rows(self, tp: TensorPlan, raws: list) -> torch.Tensor:
        """A slab of extra vocabulary rows, copied (and converted) from their source.

        A copy: the raw rows are views of a pooled buffer, and the write happens later on the
        writer thread."""
        return raws[tp.extra_source or 0][tp.name].to(self.device, ST_TO_TORCH[tp.out_dtype], copy=True)

    def _with_extra_rows(self, tp: TensorPlan, merged: torch.Tensor, raws: list) -> torch.Tensor:
        """The merged shared rows of a whole tensor, followed by the extra rows of their source (if any)."""
        if tp.extra_source is None:
            return merged
        extra = raws[tp.extra_source][tp.name][tp.shared_rows:].to(self.device, merged.dtype)
        return torch.cat([merged, extra], dim=0)

    def _name_nonfinite(self, tp: TensorPlan, raws: list, rows: int | None) -> None:
        """Raise for the first input whose copy of `tp` holds NaN/Inf (the slow check, on failure only)."""
        for info, raw in zip(self.plan.inputs, raws):
            t = raw[tp.name]
            t = t[:rows] if rows is not None else t
            if not bool(torch.isfinite(t).all()):
                self._check_finite(t, info.name, tp.name)

    def _map(self, fn: Callable, items: list) -> list:
        """fn over items, on the compute threads when there are several; results in input order."""
        if self._compute is None or len(items) < 2:
            return [fn(x) for x in items]
        return list(self._compute.map(fn, items))

    def _lowrank_merge(self, tensors: list[TensorPlan], raws: list, piece: Piece) -> list[torch.Tensor]:
        """The merged tensors (or row slabs) of a piece when every fine-tune is a LoRA adapter.

        w0·θ0 + Σt wt·(θ0 + st·Bt·At) = (w0 + Σ wt)·θ0 + [w1·s1·B1 | w2·s2·B2 | ...]·[A1; A2; ...]:
        one stacked product of rank Σr per block of rows, in float64 (see `kernels.base_plus_lowrank`).
        """
        slab = piece.rows is not None
        if piece.extra_rows:
            return [self._copied_rows(tp, raws) for tp in tensors]
        outs: list[torch.Tensor] = []
        jobs: list[tuple] = []
        for tp in tensors:
            if not tp.floating:
                outs.append(raws[0][tp.name].clone())  # raw is a view of a pooled buffer
                continue
            assert not self.method.uses_group_norms or tp.norm_group in self.norms.complete, tp.name
            w0, weights = self.method.model_weights(self._coefficients(tp.norm_group), self._ctx(tp))  # type: ignore[misc]
            base = raws[0][tp.name]
            if not slab and tp.shared_rows is not None:
                base = base[: tp.shared_rows]
            lo = piece.rows[0] if slab else 0  # type: ignore[index]
            parts: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for w, src, raw in zip(weights, self.sources, raws[1:]):
                if w == 0.0 or tp.name not in src.info.lora:  # type: ignore[attr-defined]
                    continue
                b, a, m = src.factors(tp, raw, torch.float64, self.device)  # type: ignore[attr-defined]
                # This piece's rows of Δ: rows of B, or columns of A when Δ = (B·A)ᵀ.
                if m.transposed:
                    a = a[:, lo: lo + base.shape[0]]
                else:
                    b = b[lo: lo + base.shape[0]]
                bs, as_ = parts.setdefault(m.transposed, ([], []))
                bs.append(b * (w * m.scale))
                as_.append(a)
            stacked = [(torch.cat(bs, dim=1), torch.cat(as_, dim=0), t) for t, (bs, as_) in parts.items()]
            out = torch.empty(base.shape, dtype=ST_TO_TORCH[tp.out_dtype], device=self.device)
            cols = max(1, base[0].numel()) if base.dim() else 1
            step = max(1, JOB // cols)
            c0 = w0 + sum(weights)
            jobs += [(base, stacked, c0, out, r, min(r + step, base.shape[0]))
                     for r in range(0, base.shape[0], step)]
            outs.append(out)

        def job(j: tuple) -> None:
            base, stacked, c0, out, r0, r1 = j
            kernels.base_plus_lowrank(base[r0:r1], [(b[r0:r1], a) if not t else (b, a[:, r0:r1]) for b, a, t in stacked],
                                      [t for _, _, t in stacked], c0, out=out[r0:r1])

        self._map(job, jobs)
        if not slab:
            outs = [self._with_extra_rows(tp, out, raws) if tp.floating else out for tp, out in zip(tensors, outs)]
        return outs

    def _reduce_many(self, tensors: list[TensorPlan], raws: list, piece: Piece) -> None:
        """Add the squared norms of these tensors to their groups (summed in plan order: reproducible)."""
        if piece.extra_rows:
            return  # copied rows: no task vector
        if not self.fast:
            if piece.rows is not None and piece.rows[0] > 0:
                # Low-rank path: adapters' exact norms (from their factors) are the whole
                # tensor's, so they are counted with its first slab only.
                return
            for tp in tensors:
                self._reduce(tp, raws, piece)
            return
        for tp, values in zip(tensors, self._fast_norms(tensors, raws, piece.rows is not None)):
            self.norms.add(tp.norm_group, values)

    def _reduce(self, tp: TensorPlan, raws: list, piece: Piece) -> None:
        exact = self._exact_norms(tp, raws)
        if any(e is None for e in exact):
            if raws[0] is None:  # read lazily: adapters' exact norms need no base weights
                raws[0] = self._read_base(piece)
            _, taus = self._task_vectors(tp, raws)
            exact = [squared_norm(t) if e is None else e for e, t in zip(exact, taus)]
        self.norms.add(tp.norm_group, exact)  # type: ignore[arg-type]

    def _coefficients(self, group: str) -> list[float]:
        if group not in self.coefficients:
            sq = self.norms.sq.get(group, [0.0] * len(self.plan.models)) if self.method.uses_group_norms else None
            self.coefficients[group] = self.method.coefficients(sq, len(self.plan.models))
        return self.coefficients[group]

    def _merge_tensor(self, tp: TensorPlan, raws: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One merged tensor through the method's own functions (TIES, DARE, adapters, ...)."""
        base_raw = raws[0][tp.name]
        if not tp.floating:
            # Integer buffers are copied from the base unchanged (cloned: `base_raw` lives in a
            # pooled read buffer, and the write happens later on the writer thread).
            return base_raw.clone()
        return self._with_extra_rows(tp, self._method_merge(tp, raws), raws)

    def _method_merge(self, tp: TensorPlan, raws: list) -> torch.Tensor:
        base, taus = self._task_vectors(tp, raws)
        if self.method.uses_group_norms and tp.norm_group not in self.norms.complete:
            # A norm group of this one tensor: reduce and apply at once.
            self.norms.add(tp.norm_group, self._sq_norms(tp, raws, taus))
            self.norms.complete.add(tp.norm_group)
        merged = self.method.combine(base, taus, self._coefficients(tp.norm_group), self._ctx(tp))
        return merged.to(ST_TO_TORCH[tp.out_dtype])

    # -------------------------------------------------------------- passes
    def _groups(self) -> list[StreamGroup]:
        return [g for g in self.plan.groups if not self.group_filter or self.group_filter(g)]

    def _pieces(self, group: StreamGroup) -> list[Piece]:
        """The group cut to the unit budget; row slabs only where the weighted-sum kernels merge (they
        work on any rows, while TIES/DARE and the method's own functions need whole tensors)."""
        return split_group(group, self._pooled_infos(), self.unit, slabs=self.fast or self.lowrank)

    def _pooled_infos(self) -> list[ModelInfo | None]:
        """The inputs read into the pooled buffer (base and full fine-tunes; adapters read their own)."""
        return [self.plan.base] + [s.info if s.pooled else None for s in self.sources]

    def _walk(self, pieces: list[Piece], desc: str, read: Callable[[Piece], list]):
        """Yield (piece, its tensors) in order, reading the next piece on a thread meanwhile.

        Reads are I/O and release the GIL, so the disk works while this thread merges; after each
        piece, the files no later piece of this pass reads are released (low-disk mode).
        """
        last: dict[tuple[int, str], int] = {}
        for k, piece in enumerate(pieces):
            for tp in piece.tensors:
                last[(0, self.plan.base.tensors[tp.name].file)] = k
            for src in self.sources:
                for file in src.files_of(piece.tensors):
                    last[(src.index, file)] = k
        done_after: dict[int, list[tuple[int, str]]] = {}
        for key, k in last.items():
            done_after.setdefault(k, []).append(key)
        # Prefetch only while two pieces fit in two units: a tensor larger than the unit that
        # could not be cut (TIES/DARE, adapters) is read on its own, or it would set the peak.
        infos = self._pooled_infos()
        sizes = [piece_bytes(p, infos) for p in pieces]
        budget = 2 * self.unit
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-read") as pool:
            pending = pool.submit(read, pieces[0]) if pieces else None
            for k, piece in enumerate(_progress(pieces, desc, self.progress)):
                raws = pending.result()  # type: ignore[union-attr]
                ahead = k + 1 < len(pieces) and sizes[k] + sizes[k + 1] <= budget
                pending = pool.submit(read, pieces[k + 1]) if ahead else None
                try:
                    yield piece, raws
                finally:
                    del raws
                if pending is None and k + 1 < len(pieces):
                    pending = pool.submit(read, pieces[k + 1])
                for i, file in done_after.get(k, ()):
                    self.files.release(i, self.plan.inputs[i], file)

    def _read_base(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The base's tensors of a piece, read on demand (not pooled: both pool turns are in use)."""
        data, n = read_metas(self.plan.base, 0, piece_metas(piece, self.plan.base, 0), self.files)
        self.stats.bytes_read += n
        return data

    def _read(self, piece: Piece, with_base: bool = True) -> list:
        """[base tensors (None when not read), then each source's] for one piece.

        Every input's bytes share one pooled buffer, side by side.
        """
        parts: list[tuple[ModelInfo, int, list[TensorMeta]]] = []
        if with_base:
            parts.append((self.plan.base, 0, piece_metas(piece, self.plan.base, 0)))
        parts += [(src.info, src.index, src.metas(piece)) for src in self.sources if src.pooled]
        buf = self.pool.take(sum(m.nbytes for _, _, metas in parts for m in metas))
        raws: list = [None] * len(self.plan.inputs)
        pos = 0
        for info, i, metas in parts:
            size = sum(m.nbytes for m in metas)
            raws[i], _ = read_metas(info, i, metas, self.files, buf[pos:pos + size])
            pos += size
        self.stats.bytes_read += pos
        self.stats.pieces_read += 1
        self.stats.largest_read = max(self.stats.largest_read, pos)
        for src in self.sources:
            if not src.pooled:
                raws[src.index], n = src.read(piece)
                self.stats.bytes_read += n
        return raws

    def _save_norm_state(self) -> None:
        """Norms of every group merged so far: a resumed run needs them for the shards it keeps."""
        state = {"sq_norms": self.norms.sq, "complete": sorted(self.norms.complete)}
        # Each process of a shared merge keeps its own file (the work folder is shared).
        name = NORM_STATE if self.share is None else f"norms.partial.{self.share.index}.json"
        tmp = self.work_dir / (name + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.work_dir / name)

    def _load_norm_state(self) -> None:
        # Every file of the folder counts: the norms of a group do not depend on who reduced it.
        for path in sorted(self.work_dir.glob(NORM_STATES)):
            try:
                state = json.loads(path.read_text())
                sq = {k: [float(x) for x in v] for k, v in state["sq_norms"].items()}
                complete = set(state["complete"]) & set(sq)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            self.norms.sq.update({k: sq[k] for k in complete})
            self.norms.complete.update(complete)

    def reduce_pass(self) -> None:
        """Pass 1 of a whole-model λ: accumulate squared norms of every norm group."""
        pieces = [p for g in self._groups() for p in self._pieces(g)
                  if any(t.floating for t in p.tensors) and not p.extra_rows]
        # Adapters' exact norms need no base weights (read lazily in `_reduce` if they do).
        read = lambda p: self._read(p, with_base=self.fast)  # noqa: E731
        if self.share is not None:
            self._shared_reduce(pieces, read)
        else:
            for piece, raws in self._walk(pieces, "pass 1/2: norms", read):
                self._reduce_many([t for t in piece.tensors if t.floating], raws, piece)
        self.norms.complete.update(self.norms.sq)

    def _shared_reduce(self, pieces: list[Piece], read: Callable[[Piece], list]) -> None:
        """Pass 1 split over processes: each reduces the groups it leads, recording every tensor's
        squared norms; all records are gathered and every process adds them in plan order, so the
        float64 sums are the ones a single process makes, bit for bit."""
        assert self.share is not None
        share, total = self.share, self.norms
        position = {id(p): k for k, p in enumerate(pieces)}
        records: dict[int, list[tuple[str, list[float]]]] = {}
        for piece, raws in self._walk([p for p in pieces if share.leads(p.group)], "pass 1/2: norms", read):
            self.norms = entries = _NormLog(total.n_models)
            try:
                self._reduce_many([t for t in piece.tensors if t.floating], raws, piece)
            finally:
                self.norms = total
            records[position[id(piece)]] = entries.entries
        for part in share.gather(records):
            records.update(part)
        for k in range(len(pieces)):
            for norm_group, values in records[k]:
                total.add(norm_group, values)

    def _write_steps(self, done_shards: set[int]) -> list[Piece]:
        """The pieces pass 2 (or the one pass) reads, in order.

        A norm group cut over several pieces (a 3B block at layer granularity, an embedding matrix
        in slabs at tensor granularity) must be complete before its first tensor is merged: its
        pieces are read once to reduce it (reduce-only steps), then again to merge (from the page
        cache by then). A norm group inside one piece is reduced and applied in the same step.
        """
        per_group: list[list[Piece]] = []
        for group in self._groups():
            pieces = self._pieces(group)
            todo = [p for p in pieces if any(t.shard not in done_shards for t in p.tensors)]
            if not todo:
                continue
            steps: list[Piece] = []
            if self.method.uses_group_norms and len(pieces) > 1:
                where: dict[str, set[int]] = {}
                for k, p in enumerate(pieces):
                    for t in p.tensors:
                        if t.floating and t.norm_group not in self.norms.complete:
                            where.setdefault(t.norm_group, set()).add(k)
                cut = {g for g, ks in where.items() if len(ks) > 1}
                reduce = [Piece(p.group, [t for t in p.tensors if t.floating and t.norm_group in cut],
                                rows=p.rows, reduce_only=True)
                          for p in pieces if not p.extra_rows and any(t.floating and t.norm_group in cut for t in p.tensors)]
                if reduce:
                    reduce[-1].finishes = frozenset(cut)
                steps += reduce
            steps += todo
            per_group.append(steps)
        if self.stats.passes == 2 and not getattr(self.files, "sequential", False):  # see FileProvider
            # Pass 1 just read every group in order, so the page cache holds the last ones: merging
            # the last group first reads those from memory, not disk (in order, LRU would have
            # evicted each group just before pass 2 came to it whenever the inputs are larger than
            # the cache). Shards are written at each tensor's offset, so any order makes the same bytes.
            per_group.reverse()
        return [step for steps in per_group for step in steps]

    def write_pass(self, done_shards: set[int]) -> None:
        """Merge every piece and write its tensors into their shards (skipping finished shards)."""
        label = "pass 2/2: merge" if self.plan.two_pass else "merge"
        sink = _ShardSink(self.plan, self.work_dir, self.stats)
        saved = 0
        try:
            # Adapters' exact norms need no base weights: the low-rank path's reduce-only steps skip it.
            read = lambda p: self._read(p, with_base=not (self.lowrank and p.reduce_only))  # noqa: E731
            for piece, raws in self._walk(self._write_steps(done_shards), label, read):
                if piece.reduce_only:
                    self._reduce_many(piece.tensors, raws, piece)
                    self.norms.complete.update(piece.finishes)
                    continue
                if self.method.uses_group_norms:
                    # Norm groups inside this piece: reduced before the first is applied. The
                    # method path reduces a one-tensor group from the τ it forms anyway.
                    pending = [t for t in piece.tensors if t.floating and t.norm_group not in self.norms.complete]
                    multi = {t.norm_group for t in pending if self.fast or self.lowrank
                             or sum(u.norm_group == t.norm_group for u in pending) > 1}
                    self._reduce_many([t for t in pending if t.norm_group in multi], raws, piece)
                    self.norms.complete.update(multi)
                todo = [t for t in piece.tensors if t.shard not in done_shards]
                if self.fast:
                    outs = self._fast_merge(todo, raws, piece)
                elif self.lowrank:
                    outs = self._lowrank_merge(todo, raws, piece)
                else:
                    outs = self._map(lambda tp: self._merge_tensor(tp, raws), todo)
                for tp in todo:
                    # Handed over one by one: each merged tensor is freed once written, not when
                    # the next piece's tensors exist (a block's worth of memory).
                    sink.put(tp, outs.pop(0), part=piece.rows is not None)
                    if self.method.uses_group_norms and sink.closed > saved:
                        saved = sink.closed
                        self._save_norm_state()
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        if self.method.uses_group_norms and sink.closed > saved:
            self._save_norm_state()

    def run(self, cached_norms: dict[str, list[float]] | None = None) -> None:
        """Merge into the work folder, reusing finished shards and known norms of an earlier run."""
        threads = torch.get_num_threads()
        if (self.fast or self.lowrank) and self.device.type == "cpu":
            # The fused kernels work on cache-sized chunks: splitting each over OpenMP threads
            # costs more than it gains (measured 10-30x slower on a busy 2-core machine), and the
            # other core is better spent on the prefetch thread's reads.
            torch.set_num_threads(1)
        if self.workers > 1:
            # Single-threaded like this thread: OpenMP's thread count is per thread, and a worker
            # left at the default would split BLAS reductions (the norms) by the core count, so
            # the same merge would differ in the last bits from machine to machine (or from one
            # `accelerate launch` process, which torchrun gives one thread).
            self._compute = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hf-metagpt-merge",
                                               initializer=torch.set_num_threads, initargs=(1,))
        try:
            self._run(cached_norms)
        finally:
            torch.set_num_threads(threads)
            if self._compute is not None:
                self._compute.shutdown()
                self._compute = None

    def _run(self, cached_norms: dict[str, list[float]] | None) -> None:
        start = time.perf_counter()
        mine = self.share.shards if self.share is not None else None
        done = finished_shards(self.plan, self.work_dir, only=mine)
        self.stats.shards_reused = len(done)
        # Another process's shards count as done here: this one neither reads nor writes them.
        skip = done if mine is None else done | (set(range(len(self.plan.shards))) - mine)
        if self.share is not None:
            log.debug("process %d of %d writes shards %s", self.share.index, self.share.count,
                      sorted(k + 1 for k in mine or ()))
        if self.method.uses_group_norms:
            if cached_norms is not None:
                self.norms.sq = {k: list(v) for k, v in cached_norms.items()}
                self.norms.complete.update(self.norms.sq)
            else:
                self._load_norm_state()
        if self.plan.two_pass and self.method.uses_group_norms:
            if set(self.plan.norm_groups) <= self.norms.complete:
                log.info("Squared norms known from an earlier run: pass 1 skipped.")
            else:
                self.stats.passes = 2
                self.reduce_pass()
                self._save_norm_state()
        self.write_pass(skip)
        if self.share is not None:
            self._gather()
        # Groups whose shards were all reused still get their coefficients recorded.
        for group in self.plan.norm_groups:
            if group in self.norms.complete or not self.method.uses_group_norms:
                self._coefficients(group)
        # In plan order: the compute threads record groups as they finish them (a race), and the
        # processes of a shared merge each record theirs.
        self.coefficients = {g: self.coefficients[g] for g in self.plan.norm_groups if g in self.coefficients}
        self.stats.seconds = time.perf_counter() - start

    def _gather(self) -> None:
        """Every process's norms and statistics on every process (a multi-process merge's end).

        The norms of a group are the same whoever reduced it; coefficients are then recomputed in
        plan order, the order (and values) one process records them in.
        """
        assert self.share is not None
        s = self.stats
        mine = {"sq": {g: self.norms.sq[g] for g in self.norms.complete if g in self.norms.sq},
                "stats": (s.bytes_read, s.bytes_written, s.shards_reused, s.passes)}
        parts = self.share.gather(mine)
        known: dict[str, list[float]] = {}
        for part in parts:
            for g, values in part["sq"].items():
                known.setdefault(g, values)
        order = {g: k for k, g in enumerate(self.plan.norm_groups)}
        self.norms.sq = dict(sorted(known.items(), key=lambda kv: order.get(kv[0], len(order))))
        self.norms.complete = set(known)
        s.bytes_read, s.bytes_written, s.shards_reused = (sum(p["stats"][i] for p in parts) for i in range(3))
        s.passes = max(p["stats"][3] for p in parts)
        self.coefficients = {}


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from huggingface_hub.utils import tqdm

    return tqdm(items, desc=desc, unit="group")
