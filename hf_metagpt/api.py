"""The pipeline, top to bottom: options → sources → plan (and every check) → fetch → execute → publish.

Every check that needs no weights runs before the first weight is read: the inputs' configs and
headers, the architecture (an empty-weight model built from the base's config), the output
folder, push permission and disk space. Then the work folder is locked, Hub shards are fetched,
the executor runs the schedule, and the finished folder is swapped into place and pushed.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar, Unpack

import torch

from .engine.distributed import Share, World, check_supported, connect
from .engine.executor import Executor, RunResult, RunShape
from .engine.fetch import FileProvider
from .engine.ledger import PROGRESS_FILE, NormLedger
from .engine.plan import MergePlan, build_plan
from .engine.timeline import Timeline, process_age
from .engine.workdir import (RECIPE_FILE, OutputDirs, OutputLock, cached_norms, check_output, check_side_files,
                             ledger_key, plan_key, prepare, publish, write_side_files)
from .constants import TIMELINE_ENV, TRACE_ENV, env
from .errors import IntegrityError, MainProcessStopped, MergeError, RecipeError
from .methods import get_method
from .methods.base import MergeMethod
from ._logging import bars_off, honour_progress
from ._platform import peak_rss_bytes
from .options import MergeKwargs, MergeOptions, build_options, method_parameters, public_recipe
from .result import MergeResult
from .sources.local import load_local_info
from .sources.model import ModelInfo
from .sources.refs import ModelRef, parse_ref

log = logging.getLogger("hf_metagpt")

LOW_LAMBDA = 0.01
T = TypeVar("T")


def resolve_options(options: MergeOptions | None, kwargs: dict[str, Any], *, for_merge: bool = True) -> MergeOptions:
    """The call's options, validated: the `MergeOptions` given, or one built from the keywords (not both)."""
    if options is None:
        options = build_options(for_merge=for_merge, **kwargs)
    elif kwargs:
        raise TypeError("pass either a MergeOptions or keyword arguments, not both")
    options.validate(for_merge=for_merge)
    return options


def load_infos(opts: MergeOptions) -> tuple[ModelInfo, list[ModelInfo]]:
    """Resolve every reference and read its config and safetensors headers (no weights)."""
    # huggingface_hub draws a "Parse safetensors files" bar per sharded Hub model: a blink each,
    # repeated per input; the stage is short and the plan says what was read.
    with bars_off(True):
        infos = [_load_spec(s, opts.token, opts.allow_pickle) for s in [opts.base, *opts.models]]
    return infos[0], infos[1:]


def _load_spec(spec: str, token: str | None = None, allow_pickle: bool = False) -> ModelInfo:
    """One input: a reference, or mergekit's `model+adapter` (the adapter applied before the merge)."""
    from .sources.lora_applied import applied_info, split

    parts = split(spec)
    if parts is None:
        return _load_info(parse_ref(spec), token, allow_pickle)
    model, adapter = (_load_info(parse_ref(p), token, allow_pickle) for p in parts)
    return applied_info(str(spec), model, adapter)


def _load_info(ref: ModelRef, token: str | None = None, allow_pickle: bool = False) -> ModelInfo:
    """Local folder: read its headers. Hub ID: pin it to a commit, then read remote headers only.

    Pickle-only inputs (with `allow_pickle`) come back provisional: see `sources.pickle`.
    """
    if ref.is_hub:
        from .sources import hub

        return hub.remote_info(hub.resolve(ref, token), token, allow_pickle)
    from .sources.lora import is_adapter_folder, load_adapter_info

    if is_adapter_folder(ref.local_path):
        return load_adapter_info(ref)
    if allow_pickle:
        from .sources.pickle import load_pickle_info

        if (info := load_pickle_info(ref)) is not None:
            return info
    return load_local_info(ref)


def plan(options: MergeOptions | None = None, **kwargs: Unpack[MergeKwargs]) -> MergePlan:
    """Check the inputs and lay out the merge without reading any weights (no output needed).

    Hub inputs are pinned to their commits and only their safetensors headers are read; the plan
    notes what a merge would download.

    Args:
        options: a `MergeOptions`; or its fields as keyword arguments, as for `merge` (`base`,
            `models`, `method`, `parameters`, ..., or a `recipe` to start from); `output` is optional.

    Returns:
        A `MergePlan`: the inputs (Hub ones pinned), tensors, groups, shards, warnings and notes;
        `.describe()` is what `hf-metagpt plan` prints.

    Raises:
        MergeError: an input, option or the architecture check refuses the merge (the message says why).

    Example:
        >>> print(hf_metagpt.plan(base="base/", models=["chat/", "math/"]).describe())
    """
    opts = resolve_options(options, kwargs, for_merge=False)
    method = _method(opts)
    base, models = load_infos(opts)
    the_plan = build_plan(opts, base, models, method_uses_norms=method.uses_group_norms)
    if any(info.provisional for info in the_plan.inputs):
        from .sources.pickle import plan_note

        the_plan = the_plan.with_notes([plan_note(i) for i in the_plan.inputs if i.provisional])
    if method.uses_group_norms and len(models) > 1:
        # A plan reads no weights, so it cannot measure the overlap itself: point at what does.
        the_plan = the_plan.with_notes(["MetaGPT's λ assume the task vectors are orthogonal (τi·τj ≈ 0); "
                                        "`hf-metagpt inspect` with the same inputs checks it in one read of the "
                                        "weights (cosines per layer, overlapping models and layers named)"])
    if any(i.ref.is_hub for i in the_plan.inputs):
        from .engine.fetch import download_note

        the_plan = the_plan.with_notes([download_note(the_plan)])
    return the_plan


def select_device(name: str) -> torch.device:
    """`auto` takes accelerate's choice (a GPU when present); `cuda` insists on one.

    On a machine without an accelerator, one process, `auto` is the CPU without importing
    accelerate (its choice there too; the import alone is a quarter of a CPU second per run)."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA GPU is available.",
                         hint="Use --device cpu or auto (device='cpu').")
    if name == "auto" and _no_accelerator():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


#: packages that bring an accelerator torch itself does not report (accelerate looks for them)
_DEVICE_PLUGINS = ("torch_xla", "habana_frameworks", "torch_neuronx")


def _no_accelerator() -> bool:
    """True when accelerate would pick the CPU for sure: one process, torch knows no available
    accelerator, and no device plugin accelerate probes for is installed. False when unsure."""
    import importlib.util

    from .engine.distributed import launched_processes

    if launched_processes() > 1:
        return False
    try:
        if torch.accelerator.current_accelerator(check_available=True) is not None:
            return False
    except RuntimeError:  # torch 2.6 raises when none is available
        pass
    except (AttributeError, TypeError):  # a torch without torch.accelerator: let accelerate decide
        return False
    return not any(importlib.util.find_spec(p) is not None for p in _DEVICE_PLUGINS)


@dataclass(frozen=True)
class _Job:
    """What the main process prepared (and, in a shared merge, handed to the others)."""

    plan: MergePlan
    shape: RunShape
    dirs: OutputDirs
    key: str
    cached: dict[str, list[float]] | None


@honour_progress
def merge(options: MergeOptions | None = None, *, progress: bool = True,
          **kwargs: Unpack[MergeKwargs]) -> MergeResult:
    """Merge a base model and its fine-tunes with MetaGPT (or another method), write it, push it if asked.

    Args:
        options: a `MergeOptions`; or give its fields as keyword arguments instead, e.g.
            `base` and `models` (local folders as `str | os.PathLike`, or Hub IDs `org/name[@rev]`),
            `output`, `method`, `granularity`, `parameters`, `dtype`, `push_to`, `token`, ...;
            `recipe` (a YAML file, ours or mergekit's; `recipe_format`) to start from, keywords winning.
        progress: show progress bars (False: none at all, huggingface_hub's downloads and uploads included).

    Returns:
        A `MergeResult`: λ per group and model, squared norms, statistics, warnings.

    Raises:
        MergeError: anything the user can fix (inputs, options, output folder, Hub access); its
            `hint` says how. Nothing already written is lost, and an interrupted merge resumes.

    Example:
        >>> result = hf_metagpt.merge(base="llama-base/", models=["chat/", "math/", "code/"],
        ...                           output="merged/", method="metagpt")
        >>> result.coefficients["model"]   # one λ per fine-tune (the paper's setting)
    """
    called = time.perf_counter()
    opts = resolve_options(options, kwargs)
    method = _method(opts)
    if opts.push_to and "/" not in opts.push_to:  # `NAME`: the token's namespace, known before anything is read
        from dataclasses import replace

        from .publish.push import full_repo_id

        opts = replace(opts, push_to=full_repo_id(opts.push_to, opts.token))
    # Launched as several processes (`accelerate launch`, `--num-processes`): each writes its share
    # of the shards, the main one prepares and publishes (see `distributed`). None: one process.
    world = connect(opts.device)
    main = world is None or world.is_main
    if world is not None:
        check_supported(opts.output_format, opts.low_disk)
        progress = progress and main
    device = select_device(opts.device)
    target = output_folder(opts)
    lock = OutputLock(target).acquire() if main else None
    plotting = None
    marks: dict[str, float] = {}  # `timeline`: when each part of the finish ended (join: the executor stopped its threads)
    try:
        job = _on_main(world, lambda: _prepare(opts, method, target, device.type, world))
        executor = _executor(job, method, opts, device, world, progress)
        if main:  # the card's plotting library loads while the merge runs (joined before the card)
            from .insight.plots import preload

            plotting = preload()
        run = executor.run()
        marks["join"] = time.perf_counter()
        if plotting is not None:
            plotting.join()
        marks["pictures_wait"] = time.perf_counter()
        result = _on_main(world, lambda: _finish(job, method, opts, run))
        marks["publish"] = time.perf_counter()
    finally:
        if plotting is not None:
            plotting.join()
        if lock is not None:
            lock.release()
    if opts.push_to and main:
        from .publish.push import push

        result.pushed_url = push(job.dirs.target, opts.push_to, token=opts.token, private=opts.private,
                                 create_pr=opts.create_pr, revision=opts.revision, commit_message=opts.commit_message)
        if not opts.output:  # the stable folder under the Hub cache served its purpose
            shutil.rmtree(job.dirs.target, ignore_errors=True)
            result.output = None
        marks["push"] = time.perf_counter()
    result.timeline = _timeline(called, run, marks, world)
    if main and (path := env(TIMELINE_ENV)):
        result.timeline.write(path)
    if main and (path := env(TRACE_ENV)):
        result.timeline.write_trace(path)
    return result


def _timeline(called: float, run: RunResult, marks: dict[str, float], world: World | None) -> Timeline:
    """This process's account of the merge (`engine.timeline`), from `merge()`'s call to now."""
    end = time.perf_counter()
    cpu_end = time.process_time()
    age, how = process_age()
    started = end - age if age is not None else None
    lp = run.times
    parts: dict[str, float] = {}
    last = lp.end
    for name, at in marks.items():  # the finish, by part, in the order they happened
        parts[name] = at - last
        last = at
    parts["rest"] = end - last
    stats = run.stats
    return Timeline(
        startup=called - started if started is not None else None, prepare=lp.start - called, loop=lp,
        finish=end - lp.end, finish_parts=parts,
        cpu={"startup_prepare": lp.cpu_start, "loop": lp.cpu_end - lp.cpu_start, "finish": cpu_end - lp.cpu_end},
        threads={"readers": stats.readers, "workers": stats.workers, "writers": 1}, bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written, device=stats.device, processes=world.count if world is not None else 1,
        started_by=how, staging=dict(stats.staging))


def output_folder(opts: MergeOptions) -> Path:
    """The output folder: `output`, or for `push_to` without one a stable folder under the Hub cache
    (the same for a rerun, so an interrupted merge resumes; removed after a successful push)."""
    if opts.output:
        return Path(opts.output).expanduser().resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf-metagpt" / "push" / str(opts.push_to).replace("/", "--")


def run_shape(opts: MergeOptions, the_plan: MergePlan, processes: int = 1, *, output: str | None = None) -> RunShape:
    """The run's shape, decided once: what it writes and where its files come from.

    Hub shards download while the merge runs (`overlapped`, one process) or one group ahead and
    deleted after use (`low_disk`, also for converted pickle shards); a shared merge reads files
    downloaded before it starts (`local`).
    """
    hub = any(i.ref.is_hub for i in the_plan.inputs)
    converted = any(i.weights_dir is not None for i in the_plan.inputs)
    if opts.low_disk and (hub or converted):
        files = "low_disk"
    elif hub and processes == 1:
        files = "overlapped"
    else:
        files = "local"
    if output is None:
        output = "adapter" if opts.output_format == "lora" else "shards"
    return RunShape(output=output, files=files, processes=processes)


def _prepare(opts: MergeOptions, method: MergeMethod, target: Path, device_type: str, world: World | None) -> _Job:
    """Resolve the inputs, run every check that needs no weights, prepare the work folder, fetch side files.

    One process: shards download while the merge runs (`run_shape`); a shared merge downloads
    everything now (the other processes read the Hub cache).
    """
    if opts.push_to:  # before the first read: a push that cannot happen stops the merge now
        from .publish.push import check_push_access

        check_push_access(opts.push_to, opts.token, create_pr=opts.create_pr)
    base, models = load_infos(opts)
    # The stable folder of `--push-to` without `--output` is ours: a rerun after a failed push replaces it.
    check_output(target, [base, *models], opts.overwrite or not opts.output)
    if any(info.provisional for info in (base, *models)):
        # Pickle inputs: configs, tensor names and the architecture are checked before any .bin is
        # downloaded; the shards are then converted, and the plan below checks their real shapes.
        build_plan(opts, base, models, method_uses_norms=method.uses_group_norms)
        from .sources.pickle import convert_inputs

        base, *models = convert_inputs([base, *models], opts.token)
    if any(info.lora_applied is not None for info in (base, *models)):
        # mergekit's `model+adapter`: checked as the model's headers, then applied once into a cache folder
        build_plan(opts, base, models, method_uses_norms=method.uses_group_norms)
        from .sources.lora_applied import materialize

        base, *models = [materialize(i, opts.token) if i.lora_applied is not None else i for i in (base, *models)]
    the_plan = build_plan(opts, base, models, method_uses_norms=method.uses_group_norms)
    for w in the_plan.warnings:
        log.warning("warning: %s", w)
    for n in the_plan.notes:
        log.info("note: %s", n)
    shape = run_shape(opts, the_plan, world.count if world is not None else 1)
    if shape.output == "adapter":
        from .engine.adapter_output import check_lora_output

        check_lora_output(the_plan, method)
    seed = opts.seed if method.uses_seed else None
    key = ledger_key(the_plan, method.name, method.params(), seed, allow_nonfinite=opts.allow_nonfinite,
                     device_type=device_type)
    if any(i.ref.is_hub for i in the_plan.inputs):
        from .engine import fetch

        fetch.check_disk(the_plan, target, opts.low_disk)
        if shape.files == "low_disk":
            the_plan = fetch.download(the_plan, opts.token, weights=False)
        elif shape.files == "overlapped":
            the_plan = fetch.download(the_plan, opts.token, weights=False, weight_index=True)
        else:
            the_plan = fetch.download(the_plan, opts.token)
    check_side_files(the_plan)
    if shape.output != "adapter":
        from .sources.chat_template import plan_template

        the_plan = plan_template(the_plan)
    # A merged adapter is another output than the shards of the same plan: never resume one from the other.
    adapter = shape.output == "adapter"
    dirs = prepare(target, plan_key(the_plan, key if not adapter else f"{key}|lora|{opts.lora_rank}"),
                   overwrite=opts.overwrite or not opts.output)
    cached = cached_norms(dirs.target, key) if method.uses_group_norms else None
    return _Job(the_plan, shape, dirs, key, cached)


def file_provider(shape: RunShape, the_plan: MergePlan, scratch: Path, token: str | None = None) -> FileProvider:
    """Where the inputs' files come from while the run reads them (`RunShape.files`).

    `overlapped`: Hub shards downloaded on threads into the Hub cache in walk order
    (`fetch.OverlappedFiles`); `low_disk`: fetched one group ahead into `scratch` and deleted
    after use, converted pickle shards too (`fetch.LowDiskFiles`); `local`: read in place.
    """
    from .engine import fetch

    if shape.files == "overlapped":
        return fetch.OverlappedFiles(the_plan, token)
    if shape.files == "low_disk":
        return fetch.LowDiskFiles(the_plan, scratch, token)
    return fetch.LocalFiles()


def build_executor(shape: RunShape, the_plan: MergePlan, method: MergeMethod, work: Path, *, ledger: NormLedger,
                   device: torch.device, scratch: Path, token: str | None = None, seed: int | None = None,
                   allow_nonfinite: bool = False, lora_rank: int | None = None, share: Share | None = None,
                   progress: bool = True) -> Executor:
    """The executor of a run of this shape: its file provider and feed, kernel and sink, chosen here once.

    The executor owns the provider from here on (it closes it, first, when it stops); should
    building the rest fail, the provider is closed here (its downloads may be running already).
    """
    from .engine.feed import PieceFeed
    from .engine.merging import build_kernel, sources_of
    from .engine.pieces import unit_bytes
    from .engine.sizing import readers

    files = file_provider(shape, the_plan, scratch, token)
    try:
        sources = sources_of(the_plan, files, device, allow_nonfinite=allow_nonfinite)
        kernel = build_kernel(the_plan, method, sources, device, seed=seed, allow_nonfinite=allow_nonfinite,
                              processes=shape.processes)
        unit = unit_bytes()
        feed = PieceFeed(the_plan, sources, files, unit, local=shape.files == "local",
                         readers=readers(device, shape.processes), stager=kernel.stager)
        if shape.output == "adapter":
            from .engine.adapter_output import AdapterKernel, AdapterSink, check_lora_output

            check_lora_output(the_plan, method)
            kernel, sink = AdapterKernel(kernel, lora_rank), AdapterSink(the_plan, work, lora_rank)
        elif shape.output == "norms":
            from .engine.sinks import NoOutput

            sink = NoOutput()
        else:
            from .engine.writer import ShardSink

            # Two pieces' merged tensors may wait for the writer: about half the unit.
            sink = ShardSink(the_plan, work, max_bytes=unit // 2, only=share.shards if share is not None else None,
                             progress_name=PROGRESS_FILE if share is None else f"progress.partial.{share.index}.json",
                             pinned=kernel.stager is not None and kernel.stager.pinned)
    except BaseException:
        files.close(timeout=2.0)
        raise
    return Executor(the_plan, kernel, feed, sink, ledger=ledger, share=share, progress=progress)


def _executor(job: _Job, method: MergeMethod, opts: MergeOptions, device: torch.device,
              world: World | None, progress: bool) -> Executor:
    ledger = NormLedger(len(job.plan.models), key=job.key)
    if method.uses_group_norms:
        if job.cached is not None:
            from .engine.workdir import cached_grams

            ledger.load(job.cached)
            group = {tp.name: tp.norm_group for tp in job.plan.tensors}
            ledger.load_grams((group[t], t, g) for t, g in cached_grams(job.dirs.target, job.key) if t in group)
        else:
            ledger.load_saved(job.dirs.work)
    target = job.dirs.target
    return build_executor(job.shape, job.plan, method, job.dirs.work, ledger=ledger, device=device,
                          scratch=target.parent / f".{target.name}.hf-metagpt-download", token=opts.token,
                          seed=opts.seed if method.uses_seed else None, allow_nonfinite=opts.allow_nonfinite,
                          lora_rank=opts.lora_rank, share=Share.of(world, job.plan) if world is not None else None,
                          progress=progress)


def _on_main(world: World | None, fn: Callable[[], T]) -> T:
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
    if result.geometry is not None and len(result.models) > 1:
        from .insight.geometry import overlap_warnings

        for msg in overlap_warnings(result.geometry, granularity=result.granularity):
            result.warnings.append(msg)
            log.warning("warning: %s", msg)


def _method(opts: MergeOptions) -> MergeMethod:
    """The merge method of `opts`; a granularity other than `model` only for the methods that use it."""
    method = get_method(opts.method, **method_parameters(opts))
    if opts.granularity != "model" and not method.uses_group_norms:
        raise RecipeError(f"--granularity applies to the MetaGPT methods (metagpt, metagpt_ties, metagpt_dare), "
                          f"not to {method.name}, which has no λ per group: --granularity {opts.granularity} "
                          f"would change nothing.",
                          hint="Drop --granularity (granularity: in a recipe), or use --method metagpt.")
    return method


def ledger_geometry(the_plan: MergePlan, ledger: NormLedger):
    """The task vectors' Gram matrices the ledger holds (`insight.Geometry`), or None when it lacks a
    tensor's (norms reused from a run that recorded none)."""
    from .insight.geometry import Geometry

    entries = ledger.tensor_grams(the_plan.norm_groups)
    if {t for t, _ in entries} != {tp.name for tp in the_plan.tensors if tp.floating}:
        return None
    return Geometry.from_tensors([m.ref.display for m in the_plan.models], entries)


def _finish(job: _Job, method: MergeMethod, opts: MergeOptions, run: RunResult) -> MergeResult:
    """The result, side files, coefficients, recipe and card in the work folder; then swap it into place."""
    the_plan, dirs = job.plan, job.dirs
    missing = [g for g in the_plan.norm_groups if g not in run.coefficients]
    if missing:  # the ledger is saved before every shard: a resumed run must know every group
        raise IntegrityError(f"The merge has no coefficients for {len(missing)} group(s), e.g. {missing[0]!r}; "
                             f"nothing was published.",
                             hint=f"Remove {dirs.work} and run the merge again.")
    result = MergeResult(
        output=dirs.target, base=the_plan.base.ref, models=[m.ref for m in the_plan.models], method=method.name,
        parameters=method.params(), granularity=the_plan.granularity, seed=opts.seed if method.uses_seed else None,
        coefficients=dict(run.coefficients),
        sq_norms=run.ledger.table(the_plan.norm_groups).as_lists() if method.uses_group_norms else {},
        stats=run.stats, norms_key=job.key, out_dtype=the_plan.out_dtype, warnings=list(the_plan.warnings),
        notes=list(the_plan.notes), recipe=public_recipe(opts, the_plan.base.ref, [m.ref for m in the_plan.models]),
        precision=run.precision,
        geometry=ledger_geometry(the_plan, run.ledger) if method.uses_group_norms else None,
    )
    _coefficient_warnings(result, method)
    if run.energy is not None and opts.lora_rank is not None:
        from .engine.adapter_output import energy_note

        if note := energy_note(dict(run.energy), opts.lora_rank):
            result.notes.append(note)
            log.info("note: %s", note)
    _write_publish(the_plan, job.shape, result, dirs, opts.token,
                   norms=run.ledger.state() if method.uses_group_norms else None)
    result.peak_rss = peak_rss_bytes()
    return result


def _write_publish(the_plan: MergePlan, shape: RunShape, result: MergeResult, dirs: OutputDirs,
                   token: str | None = None, norms: dict[str, Any] | None = None) -> None:
    from .publish.card import all_licenses, write_card
    from .result import COEFFICIENTS_FILE
    from .safetensors_io import disk_full_is_clear

    licenses = all_licenses(the_plan, token)
    # No space for a side file: one clear OutputError; nothing is published (the target stays absent).
    with disk_full_is_clear(dirs.work / "config.json"):
        if shape.output == "adapter":
            from .engine.adapter_output import write_adapter_side_files

            write_adapter_side_files(the_plan, dirs.work)
        else:
            write_side_files(the_plan, dirs.work)
    with disk_full_is_clear(dirs.work / COEFFICIENTS_FILE):
        result.write_coefficients(dirs.work)
    with disk_full_is_clear(dirs.work / RECIPE_FILE):
        (dirs.work / RECIPE_FILE).write_text(result.recipe)
    with disk_full_is_clear(dirs.work / "README.md"):
        write_card(result, dirs.work, licenses=licenses, repo_id=the_plan.options.push_to, geometry=result.geometry,
                   adapter=shape.output == "adapter")
    publish(dirs, norms)
