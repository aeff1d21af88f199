"""The model card (README.md) and λ plot of a merge, built from its `MergeResult`.

The front matter is huggingface_hub's `ModelCardData` (so the Hub shows the merge in every input's
model tree: `base_model` + `base_model_relation: merge`); the body explains what was merged, how,
with which coefficients, and gives the exact recipe that reproduces it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..engine.plan import MergePlan
from ..options import local_name, looks_local, public_recipe_text
from ..sources.hub import local_license, read_license, remote_files

if TYPE_CHECKING:
    from collections.abc import Mapping

    from huggingface_hub import ModelCard

    from ..insight.geometry import Geometry

    from ..result import MergeResult

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOT_FILE = "metagpt_lambdas.png"
TAGS = ["merge", "metagpt", "hf-metagpt"]
PAPER = "https://arxiv.org/abs/2406.11385"

_METHOD_TEXT = {
    "metagpt": (
        "**MetaGPT** (Zhou et al., *MetaGPT: Merging Large Language Models Using Model Exclusive Task "
        f"Arithmetic*, EMNLP 2024, [arXiv:2406.11385]({PAPER})). With base θ₀ and fine-tunes θ₁…θ_T, "
        "task vectors τ_t = θ_t − θ₀ and\n\n"
        "$$\\theta = \\theta_0 + \\sum_t \\lambda_t \\tau_t, \\qquad "
        "\\lambda_t = \\frac{\\lVert\\tau_t\\rVert^2}{\\sum_k \\lVert\\tau_k\\rVert^2}$$\n\n"
        "The coefficients need no data and no search: they are each fine-tune's share of the squared "
        "task-vector norms."
    ),
}
_GRANULARITY_TEXT = {
    "model": "one λ per fine-tune, norms over all of its parameters — **the paper's method**.",
    "layer": ("one λ per fine-tune and transformer block (tensors outside the blocks are their own "
              "groups) — an hf-metagpt extension, **not** the paper's method."),
    "tensor": "one λ per fine-tune and tensor — an hf-metagpt extension, **not** the paper's method.",
}


def choose_license(licenses: list[str | None]) -> tuple[str, str | None]:
    """The card's `license:` and a note when the inputs do not share one known licence."""
    known = {lic for lic in licenses if lic}
    if len(known) == 1 and all(licenses):
        return known.pop(), None
    if not known:
        return "other", "The licences of the inputs could not be read from their cards: check each input's licence before use."
    return "other", ("The inputs carry different licences (" + ", ".join(sorted(known)) +
                     (", and some unknown" if not all(licenses) else "") +
                     "): the merge is bound by all of them; check each before use.")


def plot_lambdas(result: "MergeResult", path: Path) -> Path:
    """PNG of λ: bars per fine-tune at `model` granularity (a one-column heatmap says less), else a
    heatmap, one row per fine-tune and one column per group.

    Drawn on a bare `Figure` with the Agg canvas: no pyplot state and no `matplotlib.use`, so the
    caller's backend (a notebook's, a GUI's) is left as it was.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..result import short_name

    if list(result.coefficients) == ["model"]:
        from ..insight.plots import plot_lambda_bars

        return plot_lambda_bars([short_name(m) for m in result.models], result.coefficients["model"], path)

    groups = list(result.coefficients)
    names = [short_name(m) for m in result.models]
    data = np.array([[result.coefficients[g][i] for g in groups] for i in range(len(names))], dtype=float)
    width = min(16.0, 3.0 + 0.35 * len(groups))
    fig = Figure(figsize=(width, 2.8 + 0.5 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-12, float(data.max(initial=0.0))))
    ax.set_yticks(range(len(names)), labels=names)
    step = max(1, len(groups) // 24)
    ax.set_xticks(range(0, len(groups), step), labels=groups[::step], rotation=60, ha="right", fontsize=7)
    ax.set_title(f"{result.method} λ per {result.granularity} group")
    if len(groups) * len(names) <= 60:
        for i in range(len(names)):
            for j in range(len(groups)):
                ax.text(j, i, f"{data[i, j]:.3f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="λ")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _ref_row(ref) -> str:
    from ..sources.hub import hub_url

    if ref.repo_id:
        sha = ref.sha or "?"
        return f"[`{ref.repo_id}`]({hub_url(ref)}) | `{sha}`"
    return f"`{local_name(ref.spec)}` (local folder) | —"


def _scrub_paths(text: str, result: "MergeResult") -> str:
    """Replace every local path of this merge that a warning or note may quote by its folder name."""
    paths: set[str] = set()
    for ref in (result.base, *result.models):
        if not ref.repo_id:
            paths.add(ref.spec)
            if ref.local_path is not None:
                paths.add(str(ref.local_path))
        elif ref.local_path is not None:  # a Hub input's snapshot in this machine's cache
            paths.add(str(ref.local_path))
    if result.output is not None:
        paths.add(str(result.output))
        paths.add(str(Path(result.output).resolve()))
    # Longest first, so a folder inside another is replaced whole; only paths that say more than a name.
    for path in sorted((p for p in paths if p and looks_local(p)), key=len, reverse=True):
        text = text.replace(path, local_name(path))
    return text


def build_card(result: "MergeResult", *, licenses: list[str | None] | None = None,
               repo_id: str | None = None, plot: str | None = PLOT_FILE, geometry: "Geometry | None" = None,
               figures: "Mapping[str, str] | None" = None) -> "ModelCard":
    """The card of a merge: metadata the Hub understands, and a body a reader can act on.

    `geometry` (the inputs' task-vector Gram matrices, models named for the public) adds the
    section that checks MetaGPT's orthogonality assumption; `figures` names its pictures.

    Example:
        >>> card = build_card(result, licenses=["llama2", "llama2", "llama2", "llama2"])
        >>> card.data.base_model_relation
        'merge'
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..result import short_name

    inputs = [result.base, *result.models]
    hub_ids = list(dict.fromkeys(r.repo_id for r in inputs if r.repo_id))
    license_, license_note = choose_license(licenses if licenses is not None else [None] * len(inputs))
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_,
        tags=list(TAGS),
    )
    if not hub_ids:
        data.base_model_relation = None

    title = repo_id.split("/")[-1] if repo_id else (result.output.name if result.output else "merged model")
    lines = [f"# {title}", ""]
    lines.append(f"A merge of {len(result.models)} fine-tune(s) of `{short_name(result.base)}` made with "
                 f"hf-metagpt {__version__} using **{result.method}** "
                 f"(granularity `{result.granularity}`).")
    local = [r for r in inputs if not r.repo_id]
    lines += _inputs_section(result, local=bool(local))
    lines += _method_section(result)
    lines += _coefficients_section(result, plot)
    if geometry is not None:
        from ..insight.card import geometry_section

        model_lam = result.coefficients.get("model") if result.granularity == "model" else None
        transform = {"metagpt_dare": "DARE", "metagpt_ties": "TIES trimming and sign election"}.get(result.method)
        lines += ["", *geometry_section(geometry, granularity=result.granularity, figures=figures,
                                        lambdas=model_lam, transformed=transform)]
    notes = list(result.warnings) + ([license_note] if license_note else [])
    if notes:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in notes]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    lines += _use_section(result, repo_id)
    lines += _reproduce_section(result, local=bool(local))
    lines += _mergekit_section(result)
    content = f"---\n{data.to_yaml()}\n---\n\n" + _scrub_paths("\n".join(lines), result)
    return ModelCard(content)


def _inputs_section(result: "MergeResult", *, local: bool) -> list[str]:
    lines = ["", "## Inputs", "", "| role | model | commit |", "|---|---|---|"]
    lines.append(f"| base | {_ref_row(result.base)} |")
    for i, m in enumerate(result.models, 1):
        role = f"LoRA adapter {i}" if m.is_adapter else f"fine-tune {i}"
        lines.append(f"| {role} | {_ref_row(m)} |")
    adapters = [m for m in result.models if m.is_adapter]
    if adapters:
        lines += ["", f"{len(adapters)} of the inputs are PEFT LoRA adapters on the base (listed in `base_model` "
                      "like every Hub input): each entered the merge as its task vector Δ = s·B·A."]
    if local:
        lines += ["", "Local inputs cannot be listed in `base_model`; they are named above by their folder "
                      "name."]
    return lines


def _method_section(result: "MergeResult") -> list[str]:
    lines = ["", "## Method", ""]
    lines.append(_METHOD_TEXT.get(result.method, f"**{result.method}** with parameters `{result.parameters}`."))
    if result.method != "metagpt" and result.method.startswith("metagpt"):
        lines.append("")
        lines.append(_METHOD_TEXT["metagpt"])
    lines += ["", f"Granularity `{result.granularity}`: {_GRANULARITY_TEXT.get(result.granularity, '')}"]
    if result.parameters:
        lines += ["", f"Parameters: `{result.parameters}`" + (f", seed {result.seed}" if result.seed is not None else "") + "."]
    lines += ["", f"Tensors were read in their stored dtype, {_precision_text(result.precision)} and written in "
                  f"`{result.out_dtype or 'the base dtype'}`."]
    return lines


def _coefficients_section(result: "MergeResult", plot: str | None) -> list[str]:
    if not result.coefficients:
        return []
    lines = ["", "## Coefficients (λ)", "", result.lambda_table(public=True), ""]
    if plot:
        alt = "MetaGPT λ of each model" if list(result.coefficients) == ["model"] else "λ per group and model"
        lines += [f"![{alt}]({plot})", ""]
    lines.append("Every group's λ and squared task-vector norms are in `metagpt_coefficients.json`.")
    return lines


def _use_section(result: "MergeResult", repo_id: str | None) -> list[str]:
    # The folder name only: a local path of the merging machine means nothing on the Hub.
    load_id = repo_id or (f"./{result.output.name}" if result.output else "path/to/merged")
    return ["", "## Use it", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{load_id}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
            "```"]


def _reproduce_section(result: "MergeResult", *, local: bool) -> list[str]:
    recipe = public_recipe_text(result.recipe)
    if not recipe:
        return []
    return ["", "## Reproduce it", "",
            f"Made with hf-metagpt {__version__}. Every Hub input is pinned to the commit that was merged"
            + ("; local inputs are named by their folder" if local else "") +
            ". Save this as `recipe.yaml` and run "
            "`hf-metagpt merge --recipe recipe.yaml --output DIR` (or `hf metagpt merge ...`):", "",
            "```yaml", recipe.rstrip("\n"), "```", ""]


def _precision_text(precision: str) -> str:
    if precision.startswith("mergekit "):
        dtype = precision.split(" ", 1)[1].replace("auto", "the inputs' dtype")
        return (f"merged with mergekit's arithmetic (mergekit 0.1.5's steps in {dtype}, in its order; "
                "`--arithmetic own` merges with hf-metagpt's float64 sums instead)")
    if precision == "float64":
        return "merged in float32 or better (weighted sums and norms accumulated in float64)"
    return f"merged in {precision} (weighted sums and norms accumulated in {precision})"


def _mergekit_section(result: "MergeResult") -> list[str]:
    """The same merge as a mergekit recipe, for the methods mergekit has (none for MetaGPT's λ)."""
    from ..mergekit_recipe import to_mergekit

    text = to_mergekit(result.method, result.parameters, result.base.pinned, [m.pinned for m in result.models],
                       result.out_dtype or None, [m.is_adapter for m in result.models])
    if text is None:
        return []
    return ["The same merge as a mergekit recipe (`mergekit-yaml mergekit.yaml OUT`; with `dtype: float32` "
            "mergekit's result equals this one within 1 ulp" + (", up to the random masks" if result.seed is not None else "")
            + "). hf-metagpt runs it too: `hf-metagpt merge --recipe mergekit.yaml`.", "",
            "```yaml", text.rstrip("\n"), "```", ""]


def write_card(result: "MergeResult", folder: Path, *, licenses: list[str | None] | None = None,
               repo_id: str | None = None, geometry: "Geometry | None" = None) -> Path:
    """Write README.md and the λ plot into `folder` (the merge's output); returns the card's path.

    With `geometry`, also the geometry section and its pictures (models named as in the card).
    """
    folder = Path(folder)
    figures: dict[str, str] = {}
    if geometry is not None:
        from ..insight.card import relabel
        from ..insight.plots import draw_all
        from ..result import short_name

        geometry = relabel(geometry, [short_name(m) for m in result.models])
        try:
            figures = {k: p.name for k, p in draw_all(geometry, folder, granularity=result.granularity,
                                                       bars=False).items()}
        except Exception as exc:  # a plot must never cost the merge
            log.warning("warning: could not draw the geometry plots (%s); the card has the text only", exc)
    plot = None
    if result.coefficients:
        try:
            plot_lambdas(result, folder / PLOT_FILE)
            plot = PLOT_FILE
        except Exception as exc:  # a plot must never cost the merge
            log.warning("warning: could not draw the λ plot (%s); the card has the table only", exc)
    card = build_card(result, licenses=licenses, repo_id=repo_id, plot=plot, geometry=geometry, figures=figures)
    path = folder / CARD_FILE
    card.save(path)
    return path


def all_licenses(plan: "MergePlan", token: str | None = None) -> list[str | None]:
    """License of every input (base first), from their cards; None where unknown."""
    out = []
    for info in plan.inputs:
        if info.ref.is_hub:
            out.append(read_license(info.ref, remote_files(info), token))
        else:
            out.append(local_license(info.ref.local_path))
    return out
