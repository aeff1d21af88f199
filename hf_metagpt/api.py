"""The pipeline, top to bottom: resolve → plan → stream → write → card → push."""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from .engine.distributed import (
    MainProcessStopped,
    Share,
    World,
    check_supported,
    connect,
)
from .engine.executor import Merger
from .engine.fetch import FileProvider
from .engine.plan import MergePlan, build_plan, check_against_skeleton
from .engine.workdir import (
    OutputDirs,
    cached_norms,
    check_output,
    norms_key,
    plan_key,
    prepare,
    publish,
    write_side_files,
)
from .errors import MergeError
from .methods import get_method
from .methods.base import MergeMethod
from .options import MergeOptions, build_options, dump_recipe
from .result import MergeResult
from .sources.local import load_local_info
from .sources.model import ModelInfo
from .sources.refs import ModelRef, parse_ref

log = logging.getLogger("hf_metagpt")

LOW_LAMBDA = 0.01


def _options(options: MergeOptions | None, kwargs: dict[str, Any]) -> MergeOptions:
    if options is None:
        return build_options(**kwargs)
    if kwargs:
        raise TypeError("pass either a MergeOptions or keyword arguments, not both")
    options.validate()
    return options


def load_infos(opts: MergeOptions) -> tuple[ModelInfo, list[ModelInfo]]:
    """Resolve every reference and read its config and safetensors headers (no weights)."""
    refs = [parse_ref(opts.base)] + [parse_ref(m) for m in opts.models]
    infos = [_load_info(r, opts.token, opts.allow_pickle) for r in refs]
    return infos[0], infos[1:]


def _load_info(ref: ModelRef, token: str | None = None, allow_pickle: bool = False) -> ModelInfo:
    """Local folder: read its headers. Hub ID: pin it to a commit, then read remote headers only.

    Pickle-only inputs (with `allow_pickle`) come back provisional: see `sources.pickle`.
    """
    if ref.is_hub:
        from .sources import hub

        remote = hub.resolve(ref, token)
        hub.remember_files(remote)
        return hub.remote_info(remote, token, allow_pickle)
    from .sources.lora import is_adapter_folder, load_adapter_info

    if is_adapter_folder(ref.local_path):
        return load_adapter_info(ref)
    return load_local_info(ref, allow_pickle)


def _fetch_inputs(the_plan: MergePlan, opts: MergeOptions, target: Path, overlap: bool = True) -> FileProvider | None:
    """Fetch what the Hub inputs need (after the plan checked them); the provider of their shards.

    Default: the side files now, the shards on threads while the merge runs (`fetch.OverlappedFiles`).
    `--low-disk`: shards fetched one group ahead and deleted after use (`fetch.LowDiskFiles`).
    `overlap=False` (a merge in several processes): everything is downloaded before merging, as the
    other processes read the shards from the Hub cache by themselves and a provider's threads
    cannot travel to them with the plan.
    """
    from .engine import fetch

    if not any(i.ref.is_hub for i in the_plan.inputs):
        if opts.low_disk and any(i.weights_dir is not None for i in the_plan.inputs):
            # converted pickle shards are deleted after their last use
            return fetch.LowDiskFiles(the_plan, target.parent / f".{target.name}.hf-metagpt-download", opts.token)
        return None

    fetch.check_disk(the_plan, target, opts.low_disk)
    if opts.low_disk:
        fetch.download(the_plan, opts.token, weights=False)
        return fetch.LowDiskFiles(the_plan, target.parent / f".{target.name}.hf-metagpt-download", opts.token)
    if not overlap:
        fetch.download(the_plan, opts.token)
        return None
    fetch.download(the_plan, opts.token, weights=False, weight_index=True)
    return fetch.OverlappedFiles(the_plan, opts.token)


def _close(files: FileProvider | None) -> None:
    """Stop a provider's downloads and threads (providers for Hub inputs have `close`)."""
    close = getattr(files, "close", None)
    if close is not None:
        close()


def plan(options: MergeOptions | None = None, **kwargs: Any) -> MergePlan:
    """Check the inputs and lay out the merge without reading any weights.

    Example:
        >>> print(hf_metagpt.plan(base="base/", models=["chat/", "math/"], output="-").describe())
    """
    opts = _options(options, kwargs)
    method = get_method(opts.method, **opts.parameters)
    base, models = load_infos(opts)
    the_plan = build_plan(opts, base, models, method_uses_norms=method.uses_group_norms)
    for info in the_plan.inputs:
        if info.provisional:
            from .sources.pickle import plan_note

            the_plan.notes.append(plan_note(info))
    if any(i.ref.is_hub for i in the_plan.inputs):
        from .engine.fetch import download_note

        the_plan.notes.append(download_note(the_plan))
    return the_plan


def select_device(name: str) -> torch.device:
    """`auto` takes accelerate's choice (a GPU when present); `cuda` insists on one."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA GPU is available.", hint="Use --device cpu or auto.")
    from accelerate import PartialState

    return PartialState().device


def merge(options: MergeOptions | None = None, *, progress: bool = True, **kwargs: Any) -> MergeResult:
    """Merge a base model and its fine-tunes and write the result (and push it when asked).

    Example:
        >>> result = hf_metagpt.merge(base="llama-base/", models=["chat/", "math/", "code/"],
        ...                           output="merged/", method="metagpt")
        >>> result.coefficients["model"]   # one λ per fine-tune (the paper's setting)
    """
    opts = _options(options, kwargs)
    method = get_method(opts.method, **opts.parameters)
    # Launched as several processes (`accelerate launch`, `--num-processes`): each writes its share
    # of the shards, the main one prepares and publishes (see `distributed`). None: one process.
    world = connect(opts.device)
    if world is not None:
        check_supported(opts.output_format, opts.low_disk)
        progress = progress and world.is_main
    seed = opts.seed if method.uses_seed else None
    params = method.params()
    lora_out = opts.output_format == "lora"
    # The main process checks, plans, prepares the work folder and downloads; the others get its plan.
    the_plan, dirs, nkey, files, local = _on_main(world, lambda: _prepare(opts, method, seed, params,
                                                                           overlap=world is None))
    base, models = the_plan.base, the_plan.models
    local = local and (world is None or world.is_main)  # the skeleton check runs once, on the main process
    merger_cls = Merger
    extra: dict[str, Any] = {}
    if lora_out:
        from .engine.adapter_output import AdapterMerger

        merger_cls, extra = AdapterMerger, {"lora_rank": opts.lora_rank}
    if world is not None:
        extra["share"] = Share.of(world, the_plan)
    try:
        merger = merger_cls(the_plan, method, dirs.work, device=select_device(opts.device), seed=seed,
                            allow_nonfinite=opts.allow_nonfinite, progress=progress, files=files, **extra)
    except BaseException:
        _close(files)  # shard downloads may be running already
        raise
    skeleton_warnings: list[str] = []
    skeleton = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-skeleton")
    skeleton_check = skeleton.submit(check_against_skeleton, base, skeleton_warnings) if local else None
    if skeleton_check is not None and world is not None:
        # In a process group the merge thread's first lazy import (peft, for TIES/DARE) was seen
        # to find transformers half-imported by the skeleton thread: let the check end first
        # (seconds, on the main process only; the others are merging meanwhile).
        wait([skeleton_check])
    try:
        merger.run(cached_norms=cached_norms(dirs.target, nkey) if method.uses_group_norms else None)
    finally:
        _close(files)
        # accelerate's init_empty_weights patches torch.nn globally while the skeleton is built:
        # never return (not even with an error) while that thread still runs.
        skeleton.shutdown(wait=True)

    def finish() -> MergeResult:
        if skeleton_check is not None:
            try:
                skeleton_check.result()
            except MergeError:
                shutil.rmtree(dirs.work, ignore_errors=True)  # nothing of a refused merge stays
                raise
            for w in skeleton_warnings:
                log.warning("warning: %s", w)
            the_plan.warnings.extend(skeleton_warnings)

        result = MergeResult(
            output=dirs.target, base=base.ref, models=[m.ref for m in models], method=method.name,
            parameters=params, granularity=the_plan.options.granularity, seed=seed,
            coefficients=merger.coefficients, sq_norms=dict(merger.norms.sq) if method.uses_group_norms else {},
            stats=merger.stats, norms_key=nkey, out_dtype=the_plan.out_dtype,
            warnings=list(the_plan.warnings), notes=list(the_plan.notes), recipe=_pinned_recipe(opts, base, models),
        )
        _coefficient_warnings(result, method)
        if lora_out and opts.lora_rank is not None:
            from .engine.adapter_output import energy_note

            if note := energy_note(merger.energy, opts.lora_rank):  # type: ignore[attr-defined]
                result.notes.append(note)
                log.info("note: %s", note)
        _finish(the_plan, result, dirs, opts.token)
        result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return result

    # Every process has every norm now (gathered); the main one writes the side files and publishes,
    # and every process returns once the output is in place.
    result = _on_main(world, finish)
    if opts.push_to and (world is None or world.is_main):
        from .publish.push import push

        result.pushed_url = push(dirs.target, opts.push_to, token=opts.token, private=opts.private,
                                 create_pr=opts.create_pr, revision=opts.revision,
                                 commit_message=opts.commit_message)
    return result


def _prepare(opts: MergeOptions, method: MergeMethod, seed: int | None, params: dict[str, Any],
             overlap: bool = True) -> tuple[MergePlan, OutputDirs, str, FileProvider | None, bool]:
    """Resolve the inputs, check the output, plan, prepare the work folder and fetch Hub inputs.

    `overlap`: shards may download while the merge runs (one process; see `_fetch_inputs`).
    """
    base, models = load_infos(opts)
    # --push-to without --output: build the folder in a temporary place (it is what gets pushed).
    target = Path(opts.output) if opts.output else \
        Path(tempfile.mkdtemp(prefix="hf-metagpt-")) / str(opts.push_to).rsplit("/", 1)[-1]
    check_output(target, [base, *models], opts.overwrite)
    if any(info.provisional for info in (base, *models)):
        # Pickle inputs: configs and tensor names are checked before any .bin is downloaded; the
        # shards are then converted, and the plan below checks their real shapes and dtypes.
        build_plan(opts, base, models, method_uses_norms=method.uses_group_norms, check_skeleton=False)
        from .sources.pickle import convert_inputs

        base, *models = convert_inputs([base, *models], opts.token)
    # Hub inputs: every check before the first download. Local inputs: the meta-model skeleton
    # check (seconds of imports) runs on a thread beside the merge and is awaited before publishing.
    local = not any(info.ref.is_hub for info in (base, *models))
    the_plan = build_plan(opts, base, models, method_uses_norms=method.uses_group_norms,
                          check_skeleton=not local)
    for w in the_plan.warnings:
        log.warning("warning: %s", w)
    for n in the_plan.notes:
        log.info("note: %s", n)

    nkey = norms_key(the_plan, method.name, params, seed)
    lora_out = opts.output_format == "lora"
    # A merged adapter is another output than the shards of the same plan: never resume one from the other.
    dirs = prepare(target, plan_key(the_plan, nkey if not lora_out else f"{nkey}|lora|{opts.lora_rank}"))
    files = _fetch_inputs(the_plan, opts, dirs.target, overlap)
    return the_plan, dirs, nkey, files, local


def _on_main(world: World | None, fn):
    """fn() in the main process; the others get its value (or stop when it fails)."""
    if world is None:
        return fn()
    if world.is_main:
        try:
            value = fn()
        except Exception as exc:
            world.broadcast(("error", str(exc)))
            raise
        world.broadcast(("ok", value))
        return value
    status, value = world.broadcast()
    if status == "error":
        raise MainProcessStopped(f"The main process stopped: {value}")
    return value


def _pinned_recipe(opts: MergeOptions, base: ModelInfo, models: list[ModelInfo]) -> str:
    """The recipe that reproduces this merge, with every Hub input pinned to its commit."""
    from dataclasses import replace

    pinned = replace(opts, base=base.ref.pinned, models=[m.ref.pinned for m in models], token=None,
                     overwrite=False)
    return dump_recipe(pinned)


def _coefficient_warnings(result: MergeResult, method: MergeMethod) -> None:
    if not method.uses_group_norms or not result.coefficients:
        return
    for i, ref in enumerate(result.models):
        lams = [c[i] for c in result.coefficients.values()]
        norms = [n[i] for n in result.sq_norms.values()]
        if all(n == 0.0 for n in norms):
            msg = f"{ref.display} equals the base everywhere: its λ is 0 and it contributes nothing"
        elif len(result.models) > 1 and all(x < LOW_LAMBDA for x in lams):
            msg = (f"{ref.display} contributes almost nothing (λ < {LOW_LAMBDA} in every group, max "
                   f"{max(lams):.4f}): squared norms favour large task vectors; consider "
                   f"--granularity layer or another --method")
        else:
            continue
        result.warnings.append(msg)
        log.warning("warning: %s", msg)


def _finish(the_plan: MergePlan, result: MergeResult, dirs: OutputDirs, token: str | None = None) -> None:
    from .publish.card import all_licenses, write_card
    from .result import COEFFICIENTS_FILE
    from .safetensors_io import disk_full_is_clear

    licenses = all_licenses(the_plan, token)
    # No space for a side file: one clear OutputError; nothing is published (the target stays absent).
    with disk_full_is_clear(dirs.work / "config.json"):
        if the_plan.options.output_format == "lora":
            from .engine.adapter_output import write_adapter_side_files

            write_adapter_side_files(the_plan, dirs.work)
        else:
            write_side_files(the_plan, dirs.work)
    with disk_full_is_clear(dirs.work / COEFFICIENTS_FILE):
        result.write_coefficients(dirs.work)
    with disk_full_is_clear(dirs.work / "hf_metagpt_recipe.yaml"):
        (dirs.work / "hf_metagpt_recipe.yaml").write_text(result.recipe)
    with disk_full_is_clear(dirs.work / "README.md"):
        write_card(result, dirs.work, licenses=licenses, repo_id=the_plan.options.push_to)
    publish(dirs)
