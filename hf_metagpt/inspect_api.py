"""`hf_metagpt.inspect`: the inputs' task-vector geometry in one streamed pass; nothing is written.

The pipeline of a merge up to its norms: resolve the references, plan (every check a merge makes),
fetch Hub shards as a merge would (`--low-disk` honoured), then one pass that reduces, per tensor,
the Gram matrix τi·τj the norms are the diagonal of (`engine/gram.py`). No output folder, no card.
It stands beside `api`, whose stages it runs; `insight/` holds the values it returns.

`_measure` runs the engine's own norm pass (an executor whose sink writes nothing), whose kernels
return a Gram matrix per tensor into the ledger: the same pieces, paths (fused chunks for full
fine-tunes, factors for LoRA adapters, formed τ otherwise) and order as pass 1 of a merge, so the
diagonals are a merge's norms bit for bit.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Unpack

import torch

from ._logging import honour_progress
from ._platform import disk_free
from .api import build_executor, load_infos, resolve_options, run_shape, select_device
from .engine import fetch
from .engine.ledger import NormLedger
from .engine.plan import build_plan
from .errors import MergeError, OutputError
from .insight.geometry import Geometry
from .insight.report import InspectResult
from .methods import get_method
from .options import InspectKwargs, MergeOptions
from .result import ref_json

log = logging.getLogger("hf_metagpt")


@honour_progress
def inspect(options: MergeOptions | None = None, /, *, progress: bool = True,
            **kwargs: Unpack[InspectKwargs]) -> InspectResult:
    """Measure the task vectors of `models` on `base`: squared norms, shares, cosines, λ per granularity.

    One streamed pass over the inputs (local folders or Hub IDs, shards fetched as a merge fetches
    them, or one group ahead and deleted after with `low_disk`); nothing is written. The inputs
    are given as for `merge` and `plan`: a `MergeOptions`, or its fields as keyword arguments.

    Args:
        options: a `MergeOptions` (its method and output are not used); or instead, as keywords:
        base: the base model: a local folder (`str | os.PathLike`) or a Hub ID `org/name[@revision]`.
        models: the fine-tunes (full models or PEFT LoRA adapters), as `base`.
        recipe: a merge recipe (ours or mergekit's) to take `base`, `models` and options from
            (keywords win over it); `recipe_format` as for `merge`.
        granularity: the merge granularity the advice is for (`model`, the paper's, by default).
        tokenizer_source, token, device, strict, low_disk: as for `merge`.
        progress: show progress bars (False: none at all, huggingface_hub's downloads included).

    Returns:
        An `InspectResult`: `.geometry` holds every per-tensor Gram matrix, `.to_json()` is
        `inspect --json`, `.table()` the text report, `.plot(folder)` the pictures.

    Raises:
        MergeError: the inputs cannot be merged (every check of `plan` applies).
        TypeError: an argument `inspect` does not take (e.g. `base` given positionally).

    Example:
        >>> r = hf_metagpt.inspect(base="base/", models=["chat/", "math/", "code/"])
        >>> r.geometry.whole.cosine(0, 1)   # near 0 when MetaGPT's orthogonality assumption holds
    """
    opts = _inspect_options(options, dict(kwargs))
    start = time.perf_counter()
    base_info, model_infos = load_infos(opts)
    # Planned at the paper's granularity: one norm group over every tensor, so the engine's norm
    # pass (pass 1) reads each tensor once; the Gram matrices do not depend on the grouping.
    the_plan = build_plan(replace(opts, granularity="model"), base_info, model_infos, method_uses_norms=True)
    for w in the_plan.warnings:
        log.warning("warning: %s", w)
    scratch = Path(tempfile.mkdtemp(prefix="hf-metagpt-inspect-"))
    try:
        shape = run_shape(opts, the_plan, output="norms")
        the_plan = _fetch(the_plan, shape, opts, scratch)
        geometry, stats = _measure(the_plan, shape, opts.token, scratch, select_device(opts.device), progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return InspectResult.build(
        base_info.ref.pinned if base_info.ref.is_hub else base_info.ref.display, geometry,
        granularity=opts.granularity, warnings=the_plan.warnings, notes=tuple(the_plan.notes),
        seconds=time.perf_counter() - start, bytes_read=stats.bytes_read,
        # The inputs as the coefficients file records them (Hub ones with the commit that was read).
        extra={"inputs": {"base": ref_json(base_info.ref), "models": [ref_json(m.ref) for m in model_infos]}})


def _inspect_options(options: Any, kwargs: dict[str, Any]) -> MergeOptions:
    """A merge's options with no output (every check `plan` makes, nothing to write), measured as MetaGPT."""
    if options is not None and not isinstance(options, MergeOptions):
        raise TypeError(f"inspect() takes a MergeOptions or keyword arguments, not {type(options).__name__} "
                        f"{options!r}: pass the inputs as base=... and models=[...], as for merge() and plan().")
    unknown = sorted(set(kwargs) - set(InspectKwargs.__annotations__))
    if unknown:
        raise TypeError(f"inspect() got an unexpected keyword argument {unknown[0]!r}; it takes "
                        f"{', '.join(InspectKwargs.__annotations__)} and progress.")
    if options is not None:
        if kwargs:
            raise TypeError("pass either a MergeOptions or keyword arguments, not both")
        # inspect measures; the method's parameters and the output are the merge's business
        options = replace(options, method="metagpt", parameters={}, output="", push_to=None, create_pr=False,
                          private=False, revision=None, commit_message=None, lora_rank=None, output_format="model")
    else:
        kwargs["method"] = "metagpt"
    return resolve_options(options, kwargs, for_merge=False)


def _fetch(the_plan, shape, opts, scratch: Path):
    """The plan reading local snapshots of the Hub inputs, fetched as a merge of this shape fetches them;
    disk is checked for the downloads only (nothing is written)."""
    if not any(i.ref.is_hub for i in the_plan.inputs):
        return the_plan
    from huggingface_hub import constants

    low_disk = shape.files == "low_disk"
    need, largest = fetch.download_bytes(the_plan, low_disk)
    where = scratch if low_disk else Path(constants.HF_HUB_CACHE)
    probe, free = disk_free(where)
    need = largest * 3 * len(the_plan.inputs) if low_disk else need
    if need > free:
        raise OutputError(f"Not enough disk space: {need / 1e9:.2f} GB of downloads under {probe}, "
                          f"{free / 1e9:.2f} GB free.",
                          hint="Free some space, point HF_HOME/HF_HUB_CACHE elsewhere, or use --low-disk "
                               "(shards are fetched as needed and deleted after use).")
    if low_disk:
        return fetch.download(the_plan, opts.token, weights=False)
    return fetch.download(the_plan, opts.token, weights=False, weight_index=True)


def _measure(the_plan, shape, token, scratch: Path, device: torch.device, progress: bool) -> tuple[Geometry, Any]:
    """The engine's norm pass (pass 1 of a whole-model merge), keeping its Gram matrices; nothing written."""
    ledger = NormLedger(len(the_plan.models))
    executor = build_executor(shape, the_plan, get_method("metagpt"), scratch / "work", ledger=ledger, device=device,
                              scratch=scratch / "download", token=token, progress=progress)
    run = executor.run()  # owns the provider from here: closes it when it stops
    entries = ledger.tensor_grams(the_plan.norm_groups)
    if {n for n, _ in entries} != {tp.name for tp in the_plan.tensors if tp.floating}:
        raise MergeError("inspect: the norm pass missed some tensors' Gram matrices.")  # a bug: say it plainly
    return Geometry.from_tensors([m.ref.display for m in the_plan.models], entries), run.stats


def describe(result: InspectResult, *, max_rows: int | None = 40) -> str:
    """The text `hf-metagpt inspect` prints (the table, warnings, what the pass read)."""
    lines = [result.table(max_rows=max_rows)]
    lines.append(f"\nread {result.bytes_read / 1e9:.3f} GB in one pass, {result.seconds:.1f} s; nothing written")
    return "\n".join(lines)


__all__ = ["inspect", "describe", "InspectResult"]
