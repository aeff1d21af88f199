"""Merge the same inputs with several methods and evaluate each merge on the tasks (loss, ALD).

A compare recipe is a merge recipe with a `compare:` section:

    base: tiny-tasks/base
    models: [tiny-tasks/chat, tiny-tasks/math, tiny-tasks/code]
    compare:
      methods: [metagpt, task_arithmetic, ties, dare_linear]
      parameters: {ties: {density: 0.5}}      # per method; the top-level `parameters` go to `method`
      tasks: {chat: tiny-tasks/data/chat.jsonl, math: "tiny-tasks/data/math.jsonl:train"}
      task_models: {chat: tiny-tasks/chat}     # default: the fine-tune whose folder/repo name is the task
      max_samples: 100
      batch_size: 16
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeError, RecipeError
from ..options import MergeOptions, build_options, parse_recipe
from ..result import MergeResult
from ..errors import TaskSpecError
from .evaluate import EvalTable, TaskSpec, evaluate, parse_task

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("metagpt", "linear", "task_arithmetic", "ties", "dare_linear")
SECTION_TITLE = "## Comparison with other merge methods"
_COMPARE_KEYS = {"methods", "parameters", "tasks", "task_models", "max_samples", "batch_size"}


@dataclass
class CompareSettings:
    """The `compare:` section of a recipe (or the same from flags)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    #: method name -> its parameters
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)
    #: task name -> the fine-tune of that task (as written in `models`)
    task_models: dict[str, str] = field(default_factory=dict)
    max_samples: int | None = None
    batch_size: int = 8


@dataclass
class CompareResult:
    """The evaluation table (reference rows and one row per method), the merges and the plot."""

    table: EvalTable
    merges: dict[str, MergeResult]
    outputs: dict[str, Path | None]
    plot: Path | None = None
    card: Path | None = None

    def to_markdown(self) -> str:
        return self.table.to_markdown()


def load_compare_recipe(path: str | Path) -> tuple[dict[str, Any], CompareSettings]:
    """A recipe's merge options (checked as usual, with their line numbers) and its `compare:` section."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"Cannot read recipe {path}: {exc.strerror}.") from None
    return parse_compare_recipe(text, str(path))


def parse_compare_recipe(text: str, source: str = "<recipe>") -> tuple[dict[str, Any], CompareSettings]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    section: Any = None
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict) and "compare" in data:
        section = data["compare"]
        # Blank the compare block out so the merge part keeps its line numbers in error messages.
        lines = text.splitlines()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "compare":
                end = v.end_mark.line + (1 if v.end_mark.column else 0)
                for i in range(k.start_mark.line, min(end, len(lines))):
                    lines[i] = ""
        text = "\n".join(lines)
    return parse_recipe(text, source), _settings(section or {}, source)


def _settings(section: Any, source: str) -> CompareSettings:
    where = f"{source}, compare"
    if not isinstance(section, dict):
        raise RecipeError(f"Recipe key 'compare' ({source}) must be a mapping.",
                          hint=f"Keys: {', '.join(sorted(_COMPARE_KEYS))}.")
    unknown = set(section) - _COMPARE_KEYS
    if unknown:
        raise RecipeError(f"Unknown key(s) {', '.join(map(repr, sorted(unknown)))} in {where}.",
                          hint=f"Known keys: {', '.join(sorted(_COMPARE_KEYS))}.")
    s = CompareSettings()
    if "methods" in section:
        s.methods = parse_methods(section["methods"])
    params = section.get("parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise RecipeError(f"{where}.parameters must map a method name to its parameters.",
                          hint="e.g. parameters: {ties: {density: 0.5}}")
    s.parameters = {str(k): dict(v) for k, v in params.items()}
    s.tasks = parse_tasks(section.get("tasks") or [])
    tm = section.get("task_models") or {}
    if not isinstance(tm, dict):
        raise RecipeError(f"{where}.task_models must map a task name to its fine-tune.")
    s.task_models = {str(k): str(v) for k, v in tm.items()}
    for key in ("max_samples", "batch_size"):
        if key in section and section[key] is not None:
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{where}.{key} must be a positive integer, not {value!r}.")
            setattr(s, key, value)
    return s


def parse_methods(value: str | Sequence[str]) -> list[str]:
    """`"metagpt,ties"` or a list -> method names (checked against the registry)."""
    from ..methods import METHODS

    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if str(m).strip()]
    if not names:
        raise MergeError("No method to compare.", hint=f"Use e.g. --methods {','.join(DEFAULT_METHODS)}.")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise MergeError(f"Unknown merge method(s): {', '.join(bad)}.", hint=f"Choose from: {', '.join(sorted(METHODS))}.")
    if len(set(names)) != len(names):
        raise MergeError(f"A method is listed twice in {', '.join(names)}.")
    return names


def parse_tasks(value: Any) -> list[TaskSpec]:
    """Tasks as a mapping name -> `DATASET[:split][:field]`, or a list of `NAME=...` specs."""
    if isinstance(value, Mapping):
        return [parse_task(f"{k}={v}") for k, v in value.items()]
    if isinstance(value, str):
        value = [value]
    return [parse_task(v) for v in value]


def _default_task_models(tasks: list[TaskSpec], models: list[str]) -> dict[str, str]:
    """Pair each task with the fine-tune whose folder (or repo) name is the task's name."""
    by_name = {}
    for m in models:
        by_name.setdefault(m.rstrip("/").split("@")[0].rsplit("/", 1)[-1], m)
    return {t.name: by_name[t.name] for t in tasks if t.name in by_name}


def compare(options: MergeOptions | Mapping[str, Any], settings: CompareSettings, *, keep: str | Path | None = None,
            plot: str | Path | None = None, card: str | Path | None = None, device: str | None = None,
            progress: bool = True) -> CompareResult:
    """Merge with each method of `settings`, evaluate base, fine-tunes and merges, plot, and fill a card.

    `keep`: write the merges to KEEP/METHOD (replaced when present) instead of a temporary folder.
    `card`: a merge folder (or the name of a kept method) whose README.md gets the table appended.

    Example:
        >>> values, settings = load_compare_recipe("recipes/compare-tiny.yaml")
        >>> print(compare(values, settings).to_markdown())
    """
    from ..api import merge
    from ..methods import get_method

    values = dict(options.to_recipe()) if isinstance(options, MergeOptions) else dict(options)
    if not settings.tasks:
        raise TaskSpecError("compare needs at least one task to evaluate on.",
                            hint="Add --task NAME=DATASET (or `tasks:` under `compare:` in the recipe).")
    methods = parse_methods(settings.methods)
    card_dir = _card_dir(card, methods, keep)
    base_opts = build_options(**{**values, "output": values.get("output") or "-"})
    models = list(base_opts.models)
    task_models = {**_default_task_models(settings.tasks, models), **settings.task_models}
    missing = [t.name for t in settings.tasks if t.name not in task_models]
    if missing:
        raise TaskSpecError(f"No fine-tune given for task(s) {', '.join(missing)}: ALD needs one per task.",
                            hint="Add task_models: {TASK: MODEL} under compare: (or --task-model TASK=MODEL), "
                                 "or name the fine-tune's folder after its task.")
    # Check every method's parameters before the first (long) merge.
    per_method = {m: _method_params(m, base_opts, settings) for m in methods}
    for m, params in per_method.items():
        get_method(m, **params)

    tmp = None if keep else tempfile.TemporaryDirectory(prefix="hf-metagpt-compare-")
    root = Path(keep) if keep else Path(tmp.name)  # type: ignore[union-attr]
    try:
        merges: dict[str, MergeResult] = {}
        for m in methods:
            opts = replace(base_opts, method=m, parameters=per_method[m], output=str(root / m), push_to=None,
                           overwrite=True, device=device or base_opts.device)
            log.info("compare: merging with %s -> %s", m, opts.output)
            merges[m] = merge(opts, progress=progress)
        rows = {"base": base_opts.base}
        roles = {"base": "base"}
        task_of = {v: k for k, v in task_models.items()}
        for ft in models:
            rows[ft] = ft
            roles[ft] = f"fine-tune ({task_of[ft]})" if ft in task_of else "fine-tune"
        for m in methods:
            rows[m] = str(root / m)
            roles[m] = "merge" + (" (paper)" if m == "metagpt" and base_opts.granularity == "model" else "")
        table = evaluate(rows, settings.tasks, max_samples=settings.max_samples, batch_size=settings.batch_size,
                         device=device or base_opts.device, task_models=task_models, roles=roles, progress=progress)
        result = CompareResult(table=table, merges=merges,
                               outputs={m: (root / m if keep else None) for m in methods})
        plot_path = Path(plot) if plot else (root / "compare.png" if keep else Path("compare.png"))
        try:
            result.plot = table.plot(plot_path, title="Per-task loss by merge method (lower is better)")
        except Exception as exc:  # a plot must never cost the comparison
            log.warning("warning: could not draw the comparison plot (%s)", exc)
        if card_dir is not None:
            result.card = append_to_card(card_dir, table, plot=result.plot, granularity=base_opts.granularity)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _method_params(method: str, opts: MergeOptions, settings: CompareSettings) -> dict[str, Any]:
    if method in settings.parameters:
        return dict(settings.parameters[method])
    return dict(opts.parameters) if method == opts.method else {}


def _card_dir(card: str | Path | None, methods: list[str], keep: str | Path | None) -> Path | None:
    if card is None:
        return None
    if str(card) in methods and not Path(card).is_dir():
        if not keep:
            raise MergeError(f"--card {card} names a merge that compare would delete.",
                             hint="Add --keep DIR to keep the merges, or give a merge folder to --card.")
        return Path(keep) / str(card)
    if not Path(card).is_dir():
        raise MergeError(f"--card {card}: no such folder.", hint="Give a merge's output folder (it holds README.md).")
    return Path(card)


def append_to_card(folder: str | Path, table: EvalTable, *, plot: Path | None = None,
                   granularity: str = "model") -> Path:
    """Add (or replace) the comparison section of `folder`/README.md, keeping its front matter."""
    import shutil

    from huggingface_hub import ModelCard

    folder = Path(folder)
    path = folder / "README.md"
    lines = [SECTION_TITLE, "",
             "Mean token loss of each model on each task's evaluation data (lower is better); EM: greedy "
             "exact match of the answer; ALD: average over tasks of (loss of the model − loss of that "
             "task's fine-tune), the quantity MetaGPT minimises. Made with `hf-metagpt compare`.", "",
             table.to_markdown(), ""]
    if granularity != "model":
        lines += [f"MetaGPT here used `--granularity {granularity}`, an hf-metagpt extension; only "
                  "`--granularity model` is the paper's method.", ""]
    if plot is not None and Path(plot).is_file():
        shutil.copyfile(plot, folder / "compare.png")
        lines += ["![Per-task loss by merge method](compare.png)", ""]
    section = "\n".join(lines)
    if path.is_file():
        card = ModelCard.load(path)
        body = card.text
        start = body.find(SECTION_TITLE)
        if start >= 0:  # rerun: replace our section, keep whatever follows it
            nxt = body.find("\n## ", start + len(SECTION_TITLE))
            body = body[:start] + section + (body[nxt + 1:] if nxt >= 0 else "")
        else:
            body = body.rstrip("\n") + "\n\n" + section
        card.text = body
        card.save(path)
    else:
        path.write_text(section)
    return path
