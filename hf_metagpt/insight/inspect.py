"""`hf_metagpt.inspect`: the inputs' task-vector geometry in one streamed pass; nothing is written.

The pipeline of a merge up to its norms: resolve the references, plan (every check a merge makes),
fetch Hub shards as a merge would (`--low-disk` honoured), then one pass that reduces, per tensor,
the Gram matrix τi·τj the norms are the diagonal of (`gram.py`). No output folder, no card.

`_measure` is the one place that touches the streaming engine: it reduces Gram matrices where
the engine reduces norms, with the same pieces, the same paths (fused chunks for full fine-tunes,
factors for LoRA adapters, formed τ otherwise) and the same order.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError, OutputError
from .geometry import Geometry
from .gram import LowRank, mixed_gram, task_gram
from .report import InspectResult

log = logging.getLogger("hf_metagpt")


def inspect(base: str | None = None, models: Sequence[str] | None = None, *, recipe: str | Path | None = None,
            granularity: str | None = None, token: str | None = None, low_disk: bool | None = None,
            device: str | None = None, strict: bool | None = None, tokenizer_source: str | None = None,
            progress: bool = True) -> InspectResult:
    """Measure the task vectors of `models` on `base`: squared norms, shares, cosines, λ per granularity.

    One streamed pass over the inputs (local folders or Hub IDs, shards fetched as a merge fetches
    them, or one group ahead and deleted after with `low_disk`); nothing is written.

    Args:
        base: the base model (local folder or Hub ID `org/name[@revision]`).
        models: the fine-tunes (full models or PEFT LoRA adapters).
        recipe: a merge recipe to take `base`, `models` and options from (arguments win).
        granularity: the merge granularity the advice is for (default `model`, the paper's).
        token, low_disk, device, strict, tokenizer_source: as for `merge`.
        progress: show progress bars.

    Returns:
        An `InspectResult`: `.geometry` holds every per-tensor Gram matrix, `.to_json()` is
        `inspect --json`, `.table()` the text report, `.plot(folder)` the pictures.

    Raises:
        MergeError: the inputs cannot be merged (every check of `plan` applies).

    Example:
        >>> r = hf_metagpt.inspect(base="base/", models=["chat/", "math/", "code/"])
        >>> r.geometry.whole.cosine(0, 1)   # near 0 when MetaGPT's orthogonality assumption holds
    """
    from ..api import _close, load_infos, select_device
    from ..engine.plan import build_plan, check_against_skeleton
    from ..options import build_options
    from ..result import _ref_json

    # A merge's options with no output: every check `plan` makes, nothing to write.
    opts = build_options(recipe, base=base, models=list(models or []) or None, output="-", method="metagpt",
                         granularity=granularity, token=token, low_disk=low_disk, device=device, strict=strict,
                         tokenizer_source=tokenizer_source)
    start = time.perf_counter()
    base_info, model_infos = load_infos(opts)
    # As a merge: Hub inputs are checked against the meta-model skeleton before any download;
    # local ones beside the pass (building the skeleton imports transformers' modeling code, seconds).
    local = not any(i.ref.is_hub for i in (base_info, *model_infos))
    the_plan = build_plan(opts, base_info, model_infos, method_uses_norms=True, check_skeleton=not local)
    skeleton_warnings: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="hf-metagpt-inspect-"))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-skeleton") as pool:
        skeleton = pool.submit(check_against_skeleton, base_info, skeleton_warnings) if local else None
        try:
            files = _fetch(the_plan, opts, scratch)
            try:
                geometry, stats = _measure(the_plan, files, select_device(opts.device), progress)
            finally:
                _close(files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if skeleton is not None:
            skeleton.result()  # raises the check's MergeError, as a merge would
    the_plan.warnings.extend(skeleton_warnings)
    for w in the_plan.warnings:
        log.warning("warning: %s", w)
    return InspectResult.build(
        base_info.ref.pinned if base_info.ref.is_hub else base_info.ref.display, geometry,
        granularity=opts.granularity, warnings=the_plan.warnings, notes=tuple(the_plan.notes),
        seconds=time.perf_counter() - start, bytes_read=stats.bytes_read,
        # The inputs as the coefficients file records them (Hub ones with the commit that was read).
        extra={"inputs": {"base": _ref_json(base_info.ref), "models": [_ref_json(m.ref) for m in model_infos]}})


def _fetch(the_plan, opts, scratch: Path):
    """The Hub inputs' shards as a merge gets them; checks disk for the downloads only (no output)."""
    if not any(i.ref.is_hub for i in the_plan.inputs):
        return None
    from ..engine import fetch as hub

    need, largest = hub.download_bytes(the_plan, opts.low_disk)
    from huggingface_hub import constants

    where = scratch if opts.low_disk else Path(constants.HF_HUB_CACHE)
    probe = next((p for p in [where, *where.parents] if p.exists()), Path("."))
    need = largest * 3 * len(the_plan.inputs) if opts.low_disk else need
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OutputError(f"Not enough disk space: {need / 1e9:.2f} GB of downloads under {probe}, "
                          f"{free / 1e9:.2f} GB free.",
                          hint="Free some space, point HF_HOME/HF_HUB_CACHE elsewhere, or use --low-disk "
                               "(shards are fetched as needed and deleted after use).")
    if opts.low_disk:
        hub.download(the_plan, opts.token, weights=False)
        return hub.LowDiskFiles(the_plan, scratch / "download", opts.token)
    hub.download(the_plan, opts.token, weights=False, weight_index=True)
    return hub.OverlappedFiles(the_plan, opts.token)


def _measure(the_plan, files, device: torch.device, progress: bool) -> tuple[Geometry, Any]:
    """One reduce pass of the streaming engine that keeps a Gram matrix per tensor instead of norms."""
    from ..methods import get_method
    from ..engine.executor import JOB, Merger
    from ..engine.tasks import _f32

    class GramPass(Merger):
        def __init__(self) -> None:
            work = Path(tempfile.mkdtemp(prefix="hf-metagpt-inspect-work-"))
            super().__init__(the_plan, get_method("metagpt"), work, device=device, files=files, progress=progress)
            self.entries: list[tuple[str, torch.Tensor]] = []

        def _reduce_many(self, tensors, raws, piece) -> None:  # the engine's norm reduction, as Gram matrices
            if piece.extra_rows:
                return
            if self.fast:
                slab = piece.rows is not None
                for tp in tensors:
                    flats = self._flats(tp, raws, slab)
                    total = None
                    # The same jobs and the same order as the norm kernel's: the diagonal is the norms.
                    for lo, hi in [(lo, min(lo + JOB, flats[0].numel())) for lo in range(0, flats[0].numel(), JOB)] or [(0, 0)]:
                        part = task_gram(flats[0][lo:hi], [m[lo:hi] for m in flats[1:]], device=self.device, chunk=self.chunk)
                        total = part if total is None else total + part
                    if not bool(torch.isfinite(total).all()):
                        self._name_nonfinite(tp, raws, None if slab else tp.shared_rows)
                    self.entries.append((tp.name, total))
                return
            if piece.rows is not None and piece.rows[0] > 0:
                return  # factors are whole-tensor: counted with the first slab only, like the norms
            for tp in tensors:
                self.entries.append((tp.name, self._gram(tp, raws, piece)))

        def _gram(self, tp, raws, piece) -> torch.Tensor:
            parts: list[torch.Tensor | LowRank | None] = []
            base = None
            for src, raw in zip(self.sources, raws[1:]):
                lora = getattr(src.info, "lora", None)
                full = getattr(src.info, "full", {})
                if lora is not None and tp.name not in full:
                    if tp.name not in lora:
                        parts.append(None)
                        continue
                    b, a, m = src.factors(tp, raw, torch.float64, self.device)
                    parts.append(LowRank(b, a, m.scale, m.transposed))
                    continue
                if base is None:
                    if raws[0] is None:  # read lazily: adapters' factors need no base weights
                        raws[0] = self._read_base(piece)
                    base = _f32(raws[0][tp.name], tp.shared_rows, self.device)
                    self._check_finite(base, self.plan.base.name, tp.name)
                tau = src.task_vector(tp, raw, base)
                self._check_finite(tau, src.info.name, tp.name)
                parts.append(tau)
            return mixed_gram(parts)

    merger = GramPass()
    threads = torch.get_num_threads()
    if (merger.fast or merger.lowrank) and device.type == "cpu":
        torch.set_num_threads(1)  # as `Merger.run`: the norms' last bits follow the thread count
    try:
        merger.reduce_pass()
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(merger.work_dir, ignore_errors=True)
    if not merger.entries and any(tp.floating for tp in the_plan.tensors):
        raise MergeError("inspect read no task vector.")  # a bug, not an input problem: say it plainly
    geometry = Geometry.from_tensors([m.ref.display for m in the_plan.models], merger.entries)
    return geometry, merger.stats


def describe(result: InspectResult, *, max_rows: int | None = 40) -> str:
    """The text `hf-metagpt inspect` prints (the table, warnings, what the pass read)."""
    lines = [result.table(max_rows=max_rows)]
    lines.append(f"\nread {result.bytes_read / 1e9:.3f} GB in one pass, {result.seconds:.1f} s; nothing written")
    return "\n".join(lines)


__all__ = ["inspect", "describe", "InspectResult"]
