"""Stream a plan: read one stream group of every model, hand tensors to the method, write shards.

Memory stays at about one transformer block of every input (in its stored dtype) plus float32
temporaries for one tensor: groups are read, merged and written one after another, and shard
bytes go to disk as soon as each tensor is merged (`ShardWriter`).

The paper's whole-model λ needs every norm before the first tensor is written, so such plans run
two passes: pass 1 only reduces squared norms, pass 2 merges. Norm groups inside one stream
group (layer/tensor granularity) are reduced and applied in the same pass.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import safe_open

from .errors import NonFiniteError
from .methods import MergeMethod, TensorContext, squared_norm
from .plan import MergePlan, ModelInfo, StreamGroup, TensorPlan
from .safetensors_io import ShardWriter, shard_matches, build_header

log = logging.getLogger(__name__)

NORM_STATE = "norms.partial.json"


class FileProvider(Protocol):
    """Where a model's weight file is on disk; `hub` implements one that downloads on demand."""

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path: ...

    def release(self, model_index: int, info: ModelInfo, file: str) -> None: ...


class LocalFiles:
    """Files already on disk under each model's `local_path`."""

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path:
        assert info.ref.local_path is not None, f"{info.name} has no local files"
        return info.ref.local_path / file

    def release(self, model_index: int, info: ModelInfo, file: str) -> None:
        pass


@dataclass
class StreamStats:
    bytes_read: int = 0
    bytes_written: int = 0
    passes: int = 1
    shards_reused: int = 0
    seconds: float = 0.0


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


def read_group(info: ModelInfo, model_index: int, tensors: list[TensorPlan], files: FileProvider) -> tuple[dict[str, torch.Tensor], int]:
    """Read the tensors of one group from one model, opening each shard once and closing it after.

    Closing matters: `safe_open` maps the file, and mapped pages count as resident memory for as
    long as the handle lives.
    """
    by_file: dict[str, list[str]] = {}
    for tp in tensors:
        by_file.setdefault(info.tensors[tp.name].file, []).append(tp.name)
    out: dict[str, torch.Tensor] = {}
    nbytes = 0
    for file, names in by_file.items():
        with safe_open(files.path(model_index, info, file), framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
                nbytes += info.tensors[name].nbytes
    return out, nbytes


def _f32(t: torch.Tensor, rows: int | None, device: torch.device) -> torch.Tensor:
    """A float32 copy on `device`, cut to the shared vocabulary rows when the plan says so."""
    if rows is not None:
        t = t[:rows]
    return t.to(device, torch.float32, copy=True)


class TaskSource:
    """One fine-tune as the engine sees it: what to read per group, τ per tensor, maybe an exact ‖τ‖².

    This class is a full fine-tune (τ = θt − θ0, its norm summed from τ). `lora.AdapterSource`
    is a LoRA adapter (τ = s·B·A, its norm from r×r matrices). Both go through the same engine
    code; only this seam differs.
    """

    def __init__(self, info: ModelInfo, index: int, files: FileProvider, device: torch.device,
                 check: Callable[[torch.Tensor, str, str], None]) -> None:
        self.info = info
        self.index = index
        self.files = files
        self.device = device
        self.check = check  # the engine's non-finite policy (raise, or zero with --allow-nonfinite)

    def files_of(self, tensors: list[TensorPlan]) -> set[str]:
        """Files read for these tensors (so a low-disk provider can release them after)."""
        return {self.info.tensors[t.name].file for t in tensors if t.floating}

    def read(self, tensors: list[TensorPlan]) -> tuple[dict[str, torch.Tensor], int]:
        # Integer buffers come from the base only; the fine-tunes' copies are never read.
        return read_group(self.info, self.index, [t for t in tensors if t.floating], self.files)

    def task_vector(self, tp: TensorPlan, raw: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """τ of one tensor in float32 on the device (`base` is θ0 in float32, already cut to rows)."""
        return _f32(raw[tp.name], tp.shared_rows, self.device).sub_(base)

    def exact_sq_norm(self, tp: TensorPlan, raw: dict[str, torch.Tensor]) -> float | None:
        """‖τ‖² without forming τ, or None when τ must be formed to know it."""
        return None


class Merger:
    """Runs a `MergePlan` with a `MergeMethod` into a work folder."""

    def __init__(self, plan: MergePlan, method: MergeMethod, work_dir: Path, *, device: torch.device,
                 files: FileProvider | None = None, seed: int | None = None, allow_nonfinite: bool = False,
                 progress: bool = True, group_filter: Callable[[StreamGroup], bool] | None = None) -> None:
        self.plan = plan
        self.method = method
        self.work_dir = work_dir
        self.device = device
        self.files = files or LocalFiles()
        self.seed = seed
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress
        self.group_filter = group_filter
        self.norms = NormState(len(plan.models))
        self.coefficients: dict[str, list[float]] = {}
        self.stats = StreamStats()
        self.sources = [self._source(info, i) for i, info in enumerate(plan.models, 1)]
        # A method that rewrites task vectors (DARE, TIES) needs the norms of the rewritten ones,
        # so exact adapter norms apply only when it leaves them as they are.
        self.transforms = type(method).transform is not MergeMethod.transform

    def _source(self, info: ModelInfo, index: int) -> TaskSource:
        if info.ref.is_adapter:
            from .lora import AdapterSource

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
        return base, self.method.transform(taus, TensorContext(tp.name, self.seed))

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

    def _reduce(self, tp: TensorPlan, raws: list, group: StreamGroup | None = None) -> None:
        exact = self._exact_norms(tp, raws)
        if any(e is None for e in exact):
            if raws[0] is None:  # read lazily: adapters' exact norms need no base weights
                raws[0] = self._read_base(group)  # type: ignore[arg-type]
            _, taus = self._task_vectors(tp, raws)
            exact = [squared_norm(t) if e is None else e for e, t in zip(exact, taus)]
        self.norms.add(tp.norm_group, exact)  # type: ignore[arg-type]

    def _coefficients(self, group: str) -> list[float]:
        if group not in self.coefficients:
            sq = self.norms.sq.get(group, [0.0] * len(self.plan.models)) if self.method.uses_group_norms else None
            self.coefficients[group] = self.method.coefficients(sq, len(self.plan.models))
        return self.coefficients[group]

    def _merge_tensor(self, tp: TensorPlan, raws: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        base_raw = raws[0][tp.name]
        if not tp.floating:
            return base_raw  # integer buffers: copied from the base unchanged
        base, taus = self._task_vectors(tp, raws)
        if self.method.uses_group_norms and tp.norm_group not in self.norms.complete:
            # A norm group of this one tensor: reduce and apply at once.
            self.norms.add(tp.norm_group, self._sq_norms(tp, raws, taus))
            self.norms.complete.add(tp.norm_group)
        merged = self.method.combine(base, taus, self._coefficients(tp.norm_group))
        out = merged.to(_st_torch(tp.out_dtype))
        if tp.extra_source is not None:
            extra = raws[tp.extra_source][tp.name][tp.shared_rows:].to(self.device, out.dtype)
            out = torch.cat([out, extra], dim=0)
        return out

    # -------------------------------------------------------------- passes
    def _groups(self) -> list[StreamGroup]:
        return [g for g in self.plan.groups if not self.group_filter or self.group_filter(g)]

    def _walk(self, groups: list[StreamGroup], desc: str):
        """Yield groups in order; after each, release the files no later group of this pass reads."""
        last: dict[tuple[int, str], int] = {}
        for k, group in enumerate(groups):
            for tp in group.tensors:
                last[(0, self.plan.base.tensors[tp.name].file)] = k
            for src in self.sources:
                for file in src.files_of(group.tensors):
                    last[(src.index, file)] = k
        done_after: dict[int, list[tuple[int, str]]] = {}
        for key, k in last.items():
            done_after.setdefault(k, []).append(key)
        for k, group in enumerate(_progress(groups, desc, self.progress)):
            yield group
            for i, file in done_after.get(k, ()):
                self.files.release(i, self.plan.inputs[i], file)

    def _read_base(self, group: StreamGroup) -> dict[str, torch.Tensor]:
        data, n = read_group(self.plan.base, 0, group.tensors, self.files)
        self.stats.bytes_read += n
        return data

    def _read(self, group: StreamGroup, with_base: bool = True) -> list:
        """[base tensors (None when not read yet), then each source's raw tensors] for one group."""
        raws: list = [self._read_base(group) if with_base else None]
        for src in self.sources:
            data, n = src.read(group.tensors)
            self.stats.bytes_read += n
            raws.append(data)
        return raws

    def _save_norm_state(self) -> None:
        """Norms of every group merged so far: a resumed run needs them for the shards it keeps."""
        state = {"sq_norms": self.norms.sq, "complete": sorted(self.norms.complete)}
        tmp = self.work_dir / (NORM_STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.work_dir / NORM_STATE)

    def _load_norm_state(self) -> None:
        path = self.work_dir / NORM_STATE
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text())
            sq = {k: [float(x) for x in v] for k, v in state["sq_norms"].items()}
            complete = set(state["complete"]) & set(sq)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        self.norms.sq.update({k: sq[k] for k in complete})
        self.norms.complete.update(complete)

    def reduce_pass(self) -> None:
        """Pass 1 of a whole-model λ: accumulate squared norms of every norm group."""
        groups = self._groups()
        for group in self._walk(groups, "pass 1/2: norms"):
            floating = [t for t in group.tensors if t.floating]
            if not floating:
                continue
            raws = self._read(group, with_base=False)
            for tp in floating:
                self._reduce(tp, raws, group)
        self.norms.complete.update(self.norms.sq)

    def write_pass(self, done_shards: set[int]) -> None:
        """Merge every group and write its tensors into their shards (skipping finished shards)."""
        plan = self.plan
        writers: dict[int, ShardWriter] = {}
        label = "pass 2/2: merge" if plan.two_pass else "merge"
        try:
            for group in self._walk(self._groups(), label):
                todo = [t for t in group.tensors if t.shard not in done_shards]
                if not todo:
                    continue
                raws = self._read(group)
                if self.method.uses_group_norms:
                    # Norm groups spanning several tensors of this stream group (a block at
                    # layer granularity): reduce them all before the first is applied.
                    pending = [t for t in group.tensors if t.floating and t.norm_group not in self.norms.complete]
                    multi = {t.norm_group for t in pending if sum(u.norm_group == t.norm_group for u in pending) > 1}
                    for tp in pending:
                        if tp.norm_group in multi:
                            self._reduce(tp, raws)
                    self.norms.complete.update(multi)
                for tp in todo:
                    out = self._merge_tensor(tp, raws)
                    w = writers.get(tp.shard)
                    if w is None:
                        shard = plan.shards[tp.shard]
                        w = writers[tp.shard] = ShardWriter(self.work_dir / (shard.file + ".tmp"), _entries(shard.tensors))
                    w.write(tp.name, out)
                    if w.done:
                        w.close()
                        (self.work_dir / (shard_file := plan.shards[tp.shard].file + ".tmp")).rename(self.work_dir / shard_file[:-4])
                        self.stats.bytes_written += w.size
                        del writers[tp.shard]
                        if self.method.uses_group_norms:
                            self._save_norm_state()
                del raws
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    def run(self, cached_norms: dict[str, list[float]] | None = None) -> None:
        """Merge into the work folder, reusing finished shards and known norms of an earlier run."""
        start = time.perf_counter()
        done = finished_shards(self.plan, self.work_dir)
        self.stats.shards_reused = len(done)
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
        self.write_pass(done)
        # Groups whose shards were all reused still get their coefficients recorded.
        for group in self.plan.norm_groups:
            if group in self.norms.complete or not self.method.uses_group_norms:
                self._coefficients(group)
        self.stats.seconds = time.perf_counter() - start


def _entries(tensors: list[TensorPlan]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.out_dtype, t.out_shape) for t in tensors]


def shard_header(plan: MergePlan, k: int) -> bytes:
    header, _ = build_header(_entries(plan.shards[k].tensors), {"format": "pt"})
    return header


def finished_shards(plan: MergePlan, work_dir: Path) -> set[int]:
    """Shards a previous run completed (same header, full size): a resumed run keeps them."""
    return {k for k, s in enumerate(plan.shards)
            if (work_dir / s.file).is_file() and shard_matches(work_dir / s.file, shard_header(plan, k))}


def _st_torch(code: str) -> torch.dtype:
    from .safetensors_io import ST_TO_TORCH

    return ST_TO_TORCH[code]


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from huggingface_hub.utils import tqdm

    return tqdm(items, desc=desc, unit="group")
