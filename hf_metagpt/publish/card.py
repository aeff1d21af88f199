"""The model card (README.md) and λ plot of a merge, built from its `MergeResult`.

The front matter is huggingface_hub's `ModelCardData` (so the Hub shows the merge in every input's
model tree: `base_model` + `base_model_relation: merge`); the body explains what was merged, how,
with which coefficients, and gives the exact recipe that reproduces it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .._version import __version__
from ..engine.plan import MergePlan
from ..options import local_name, looks_local, public_recipe_text
from ..result import METAGPT_METHODS, METHOD_LABEL, plural, public_parameters, short_name, uses_lambdas
from ..sources.hub import License, local_license, read_license, remote_files

if TYPE_CHECKING:
    from collections.abc import Mapping

    from huggingface_hub import ModelCard

    from ..insight.geometry import Geometry

    from ..result import MergeResult

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOT_FILE = "metagpt_lambdas.png"
TAGS = ["merge", "metagpt", "hf-metagpt"]  # a MetaGPT merge's; other methods name theirs (`method_tags`)
#: the methods whose coefficients are MetaGPT's λ (norm shares): only their cards show λ and granularity

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


_TIES = ("**TIES-Merging** (Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, "
         "NeurIPS 2023, [arXiv:2306.01708](https://arxiv.org/abs/2306.01708))")
_DARE = ("**DARE** (Yu et al., *Language Models are Super Mario*, ICML 2024, "
         "[arXiv:2311.03099](https://arxiv.org/abs/2311.03099))")
_SIGNS = ("a sign is elected per parameter (that of Σ_t w_t τ̃_t) and only the entries that agree with it "
          "are summed")
_METHOD_TEXT.update({
    "linear": (
        "**Linear** merge (a weighted average, as in model soups: Wortsman et al., ICML 2022, "
        "[arXiv:2203.05482](https://arxiv.org/abs/2203.05482)). Every tensor is\n\n"
        "    θ = Σ_t w_t θ_t / Σ_t w_t        (without `normalize`: Σ_t w_t θ_t)\n\n"
        "the average of the fine-tunes weighted by `weights` (1 each by default). The base's weights do not "
        "enter; its config and tokenizer do."
    ),
    "task_arithmetic": (
        "**Task arithmetic** (Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023, "
        "[arXiv:2212.04089](https://arxiv.org/abs/2212.04089)). With base θ₀, task vectors τ_t = θ_t − θ₀ "
        "and weights w_t (1 each by default):\n\n"
        "    θ = θ₀ + λ · Σ_t w_t τ_t        (÷ Σ_t w_t with `normalize`)"
    ),
    "ties": (
        f"{_TIES}. Each task vector τ_t = θ_t − θ₀ is trimmed to its largest `density` fraction of "
        f"magnitudes (τ̃_t), {_SIGNS}:\n\n"
        "    θ = θ₀ + λ · Σ_t w_t m_t τ̃_t / Σ_t w_t m_t        (m_t = 1 where τ̃_t agrees with the elected sign)"
    ),
    "dare_linear": (
        f"{_DARE}. Each task vector τ_t = θ_t − θ₀ keeps every entry with probability `density` (a seeded "
        "random mask) and is rescaled to keep its size (τ̃_t); then, as in task arithmetic,\n\n"
        "    θ = θ₀ + λ · Σ_t w_t τ̃_t        (÷ Σ_t w_t with `normalize`)"
    ),
    "dare_ties": (
        f"{_DARE}, with TIES's sign election. Each task vector τ_t = θ_t − θ₀ keeps every entry with "
        f"probability `density` (a seeded random mask) and is rescaled (τ̃_t); {_SIGNS}:\n\n"
        "    θ = θ₀ + λ · Σ_t w_t m_t τ̃_t        (÷ Σ_t w_t m_t with `normalize`)"
    ),
    "breadcrumbs": (
        "**Model Breadcrumbs** (Davari & Belilovsky, 2023, [arXiv:2312.06795](https://arxiv.org/abs/2312.06795)). "
        "Each task vector drops its largest `gamma` fraction of magnitudes (outliers) and then the smallest, "
        "keeping `density` of its entries (τ̃_t):\n\n"
        "    θ = θ₀ + λ · Σ_t w_t τ̃_t        (÷ Σ_t w_t with `normalize`)"
    ),
    "breadcrumbs_ties": (
        "**Model Breadcrumbs** (Davari & Belilovsky, 2023, [arXiv:2312.06795](https://arxiv.org/abs/2312.06795)) "
        f"with TIES's sign election: each task vector drops its largest `gamma` and smallest magnitudes, keeping "
        f"`density` (τ̃_t); {_SIGNS}:\n\n"
        "    θ = θ₀ + λ · Σ_t w_t m_t τ̃_t        (÷ Σ_t w_t m_t with `normalize`)"
    ),
    "della": (
        "**DELLA** (Deep et al., 2024, [arXiv:2406.11617](https://arxiv.org/abs/2406.11617)). Each task vector "
        "keeps every entry with a probability of `density` ± `epsilon` by its magnitude rank in its row, "
        f"rescaled (τ̃_t); {_SIGNS}:\n\n"
        "    θ = θ₀ + λ · Σ_t w_t m_t τ̃_t        (÷ Σ_t w_t m_t with `normalize`)"
    ),
    "della_linear": (
        "**DELLA** (Deep et al., 2024, [arXiv:2406.11617](https://arxiv.org/abs/2406.11617)) without sign "
        "election. Each task vector keeps every entry with a probability of `density` ± `epsilon` by its "
        "magnitude rank in its row, rescaled (τ̃_t):\n\n"
        "    θ = θ₀ + λ · Σ_t w_t τ̃_t        (÷ Σ_t w_t with `normalize`)"
    ),
    "slerp": (
        "**SLERP**, spherical linear interpolation between two models, tensor by tensor:\n\n"
        "    θ = sin((1 − t)Ω) / sin Ω · θ₀ + sin(tΩ) / sin Ω · θ₁\n\n"
        "with cos Ω the cosine between the two normalised tensors (a straight linear interpolation where "
        "they are almost parallel). t = 0 is the first endpoint (the base), t = 1 the second."
    ),
    "model_stock": (
        "**Model Stock** (Jang et al., *Model Stock: All we need is just a few fine-tuned models*, ECCV 2024, "
        "[arXiv:2403.19522](https://arxiv.org/abs/2403.19522)). Per tensor, the fine-tunes' mean is pulled "
        "back toward the base (the anchor) by how much their task vectors agree:\n\n"
        "    θ = t · mean_t(θ_t) + (1 − t) · θ₀,    t = N·cos / (1 + (N − 1)·cos)\n\n"
        "cos being the mean pairwise cosine of the N task vectors (per row with `filter_wise`)."
    ),
    "sce": (
        "**SCE** (Wan et al., *FuseChat*, 2024, [arXiv:2408.07990](https://arxiv.org/abs/2408.07990)): select "
        "the parameters of largest variance across the models (`select_topk`), weight each model per tensor "
        "by its energy (w_t = mean(τ_t²) / Σ_k mean(τ_k²)), and erase the entries that disagree with the "
        "elected sign:\n\n"
        "    θ = θ₀ + Σ_t w_t m_t τ_t / Σ_t w_t m_t"
    ),
    "metagpt_ties": (
        f"TIES trimming and sign election first ({_TIES}: each task vector keeps its largest `density` "
        "fraction of magnitudes, and only entries agreeing with the elected sign stay), then MetaGPT's λ "
        "computed from the trimmed task vectors — an hf-metagpt combination of the two."
    ),
    "metagpt_dare": (
        f"DARE first ({_DARE}: each task vector keeps every entry with probability `density`, a seeded mask, "
        "rescaled by 1/density), then MetaGPT's λ computed from the dropped task vectors — an hf-metagpt "
        "combination of the two."
    ),
})
_METHOD_TEXT.update({
    "karcher": (
        "**Karcher mean** (the Riemannian or Fréchet mean on the sphere; Karcher, *Riemannian center of mass "
        "and mollifier smoothing*, 1977), as mergekit's `karcher`. Per tensor, each model is split into its "
        "norm r_t and direction u_t = θ_t / r_t; the mean direction m minimises the sum of squared angles to "
        "the u_t, found by Karcher's fixed-point iteration (at most `max_iter` steps, until the mean tangent "
        "is shorter than `tol`), and\n\n"
        "    θ = (Σ_t r_t / N) · m\n\n"
        "with every model weighted equally. No base is involved: its config and tokenizer are kept."
    ),
    "arcee_fusion": (
        "**Arcee Fusion** (mergekit's `arcee_fusion`, from Arcee's mergekit v0.1 release). Per tensor, with "
        "δ = θ₁ − θ₀, each element's importance is |δ| times the KL divergence KL(softmax(θ₁) ‖ softmax(θ₀)) "
        "of its row, and only the outlying importances (above median + 1.5 × interquartile range) move the "
        "base:\n\n"
        "    θ = θ₀ + m ⊙ δ,    m = [importance > median + 1.5·IQR]\n\n"
        "so the base keeps its values everywhere else."
    ),
})
_METHOD_TEXT["dare"] = _METHOD_TEXT["dare_linear"]



def method_tags(method: str) -> list[str]:
    """The card's tags: `merge`, the method (and MetaGPT for its combinations), `hf-metagpt`."""
    if method == "metagpt":
        return list(TAGS)
    extra = ["metagpt"] if method in METAGPT_METHODS else []
    return ["merge", method, *extra, "hf-metagpt"]


def choose_license(licenses: "list[str | License | None]") -> tuple[str, str | None]:
    """The card's `license:` and a note when the inputs do not share one known licence (a custom
    licence, `License`, counts by its name: two `other` licences of different names differ)."""
    known = {str(lic) for lic in licenses if lic}
    if len(known) == 1 and all(licenses):
        only = next(lic for lic in licenses if lic)
        return ("other" if isinstance(only, License) else str(only)), None
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

    from ..insight.plots import add_colorbar, fit_margins, new_figure, save_png

    if list(result.coefficients) == ["model"]:
        from ..insight.plots import plot_lambda_bars

        return plot_lambda_bars([short_name(m) for m in result.models], result.coefficients["model"], path)

    groups = list(result.coefficients)
    names = [short_name(m) for m in result.models]
    data = np.array([[result.coefficients[g][i] for g in groups] for i in range(len(names))], dtype=float)
    # The heatmap's own box grows with the groups and models; the figure adds what its labels need.
    box = (0.62 * min(16.0, 3.0 + 0.35 * len(groups)), 0.77 * (2.8 + 0.5 * len(names)))
    fig = new_figure(box[1] + 1.5, box[0] + 3.0, dpi=110)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-12, float(data.max(initial=0.0))))
    ax.set_yticks(range(len(names)), labels=names)
    _lambda_axis(ax, groups)
    ax.set_title(f"{result.method} λ per {result.granularity} group")
    if len(groups) * len(names) <= 60:
        for i in range(len(names)):
            for j in range(len(groups)):
                ax.text(j, i, f"{data[i, j]:.3f}", ha="center", va="center", color="w", fontsize=7)
    fit_margins(fig, ax, add_colorbar(fig, im, label="λ"), box=box)
    return save_png(fig, path)


def _lambda_axis(ax, groups: list[str]) -> None:
    """x labels a reader can follow on hundreds of columns (a 7B model has 291 tensors): one per block,
    at its first column (every k-th block past MAX_XLABELS), and each tensor outside the blocks."""
    from ..insight.geometry import norm_group_of
    from ..insight.plots import MAX_XLABELS, short_group

    blocks = [norm_group_of(g, "layer") for g in groups]
    starts = [k for k, b in enumerate(blocks) if k == 0 or b != blocks[k - 1]]
    n_blocks = sum(1 for k in starts if blocks[k].startswith("layers."))
    step = max(1, -(-n_blocks // MAX_XLABELS))
    ticks = [k for n, k in enumerate(starts) if not blocks[k].startswith("layers.") or n % step == 0]
    one_per_tensor = len(starts) < len(groups)
    ax.set_xticks(ticks, labels=[short_group(blocks[k]) if blocks[k] != groups[k] or one_per_tensor
                                 else short_group(groups[k]) for k in ticks],
                  rotation=90, fontsize=8 if len(ticks) > 24 else 9)
    if one_per_tensor:
        for k in starts[1:]:
            ax.axvline(k - 0.5, color="white", linewidth=0.4)
        ax.set_xlabel("block (layers.N, one column per tensor) or tensor outside the blocks", fontsize=9)


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
               figures: "Mapping[str, str] | None" = None, adapter: bool = False) -> "ModelCard":
    """The card of a merge: metadata the Hub understands, and a body a reader can act on.

    `geometry` (the inputs' task-vector Gram matrices, models named for the public) adds the
    section that checks MetaGPT's orthogonality assumption; `figures` names its pictures. `adapter`:
    the output is a PEFT LoRA adapter (`--output-format lora`), loaded with peft.

    Example:
        >>> card = build_card(result, licenses=["llama2", "llama2", "llama2", "llama2"])
        >>> card.data.base_model_relation
        'merge'
    """
    from huggingface_hub import ModelCard, ModelCardData


    inputs = [result.base, *result.models]
    hub_ids = list(dict.fromkeys(r.repo_id for r in inputs if r.repo_id))
    license_, license_note = choose_license(licenses if licenses is not None else [None] * len(inputs))
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        license=license_,
        tags=method_tags(result.method),
    )
    if not hub_ids:
        data.base_model_relation = None
    if license_ == "other":  # the Hub asks a custom licence for a name and a link
        custom = [lic for lic in (licenses or []) if isinstance(lic, License)]
        if custom and license_note is None:  # every input under the same custom licence: carry its name and link
            data.license_name = custom[0].name
            data.license_link = next((c.link for c in custom if c.link), None) or "README.md#licence"
        else:
            known = sorted({lic.name if isinstance(lic, License) else str(lic)
                            for lic in (licenses or []) if lic and lic != "other"})
            data.license_name = "-and-".join(known) if len(known) > 1 else ("unknown" if not known else "other")
            data.license_link = "README.md#licence"

    title = repo_id.split("/")[-1] if repo_id else (result.output.name if result.output else "merged model")
    lines = [f"# {title}", ""]
    lines.append(_intro(result))
    local = [r for r in inputs if not r.repo_id]
    lines += _inputs_section(result, local=bool(local))
    lines += _method_section(result)
    if uses_lambdas(result.method):
        lines += _coefficients_section(result, plot)
    if geometry is not None and uses_lambdas(result.method):
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
    lines += _use_section(result, repo_id, adapter=adapter)
    lines += _limitations_section(result)
    lines += _licence_section(result, licenses)
    lines += _reproduce_section(result, local=bool(local))
    lines += _mergekit_section(result)
    content = f"---\n{data.to_yaml()}\n---\n\n" + _scrub_paths("\n".join(lines), result)
    return ModelCard(content)


def _inputs_section(result: "MergeResult", *, local: bool) -> list[str]:
    lines = ["", "## Inputs", "", "| role | model | commit |", "|---|---|---|"]
    base_role, model_role = _ROLES.get(result.method, ("base", "fine-tune {i}"))
    lines.append(f"| {base_role} | {_ref_row(result.base)} |")
    for i, m in enumerate(result.models, 1):
        role = f"LoRA adapter {i}" if m.is_adapter else model_role.format(i=i)
        lines.append(f"| {role} | {_ref_row(m)} |")
    adapters = [m for m in result.models if m.is_adapter]
    if adapters:
        lines += ["", f"{len(adapters)} of the inputs are PEFT LoRA adapters on the base (listed in `base_model` "
                      "like every Hub input): each entered the merge as its task vector Δ = s·B·A."]
    if local:
        lines += ["", "Local inputs cannot be listed in `base_model`; they are named above by their folder "
                      "name."]
    return lines


_ROLES = {"slerp": ("endpoint t = 0 (base)", "endpoint t = 1"),
          "model_stock": ("anchor (base)", "fine-tune {i}"),
          "linear": ("base (config and tokenizer; not averaged)", "averaged model {i}")}


def _intro(result: "MergeResult") -> str:

    base = f"`{short_name(result.base)}`"
    made = f"made with hf-metagpt {__version__}"
    if result.method == "slerp" and len(result.models) == 1:
        t = result.parameters.get("t")
        at = f" at t = {t}" if isinstance(t, (int, float)) else ""
        return (f"A spherical interpolation (SLERP) between {base} and `{short_name(result.models[0])}`{at}, "
                f"{made}.")
    label = METHOD_LABEL.get(result.method, result.method)
    article = "An" if label[0].lower() in "aeiou" else "A"
    text = f"{article} {label} merge of {plural(len(result.models), 'fine-tune')} of {base}, {made}"
    if uses_lambdas(result.method):
        text += f" (granularity `{result.granularity}`)"
    return text + "."


def _method_section(result: "MergeResult") -> list[str]:
    import yaml

    lines = ["", "## Method", ""]
    lines.append(_METHOD_TEXT.get(result.method, f"**{result.method}**."))
    if result.method in ("metagpt_ties", "metagpt_dare"):
        lines += ["", _METHOD_TEXT["metagpt"]]
    if uses_lambdas(result.method):
        lines += ["", f"Granularity `{result.granularity}`: {_GRANULARITY_TEXT.get(result.granularity, '')}"]
    params = public_parameters(result)
    if params:
        lines += ["", "Parameters:", "", "```yaml",
                  yaml.safe_dump(params, sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip("\n"),
                  "```"]
    lines += ["", f"Tensors were read in their stored dtype, {_precision_text(result)} and written in "
                  f"`{result.out_dtype or 'the base dtype'}`."]
    return lines


def _limitations_section(result: "MergeResult") -> list[str]:
    lines = ["", "## Evaluation and limitations", "",
             "This merge was not evaluated by hf-metagpt: no benchmark was run on it. A merge can lose some of "
             "each fine-tune's skill, and it inherits the limitations, biases and licences of every input. "
             "Evaluate it on your own tasks before use (`hf-metagpt compare` merges with several methods and "
             "measures each on task data)."]
    if uses_lambdas(result.method):
        lines += ["", "MetaGPT's λ assume the fine-tunes changed the base in unrelated directions (orthogonal "
                      "task vectors); the geometry section above, where present, says how far that holds here."]
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


def _licence_section(result: "MergeResult", licenses: list[str | None] | None) -> list[str]:

    inputs = [result.base, *result.models]
    known = licenses if licenses is not None else [None] * len(inputs)
    lines = ["", "## Licence", "", "A merge is bound by the licence of every input:", "",
             "| input | licence |", "|---|---|"]
    lines += [f"| `{short_name(r)}` | {lic or 'unknown'} |" for r, lic in zip(inputs, known)]
    return lines


def _use_section(result: "MergeResult", repo_id: str | None, *, adapter: bool = False) -> list[str]:
    # The folder name only: a local path of the merging machine means nothing on the Hub.
    load_id = repo_id or (f"./{result.output.name}" if result.output else "path/to/merged")
    if adapter:
        return ["", "## Use it", "", "A PEFT LoRA adapter on the base (loading it also downloads the base):", "",
                "```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{load_id}", dtype="auto")',
                f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")', "```"]
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


def _precision_text(result: "MergeResult") -> str:
    precision = result.precision
    if precision.startswith("mergekit "):
        dtype = precision.split(" ", 1)[1].replace("auto", "the inputs' dtype")
        return (f"merged with mergekit's arithmetic (mergekit 0.1.5's steps in {dtype}, in its order; "
                "`--arithmetic own` merges with hf-metagpt's float64 sums instead)")
    what = "weighted sums and norms" if uses_lambdas(result.method) else "weighted sums"
    if precision == "float64":
        return f"merged in float32 or better ({what} accumulated in float64)"
    return f"merged in {precision} ({what} accumulated in {precision})"


def _mergekit_section(result: "MergeResult") -> list[str]:
    """The same merge as a mergekit recipe, for the methods mergekit has (none for MetaGPT's λ)."""
    from ..mergekit_recipe import to_mergekit
    from ..options import load_yaml

    recipe = load_yaml(result.recipe) if result.recipe else None
    if isinstance(recipe, dict) and (recipe.get("layers") or recipe.get("vocabulary")):
        return []  # layer maps (slices) and tokenizer vocabularies: the recipe it came from says it best
    text = to_mergekit(result.method, result.parameters, result.base.pinned, [m.pinned for m in result.models],
                       result.out_dtype or None, [m.is_adapter for m in result.models])
    if text is None:
        return []
    return ["The same merge as a mergekit recipe (`mergekit-yaml mergekit.yaml OUT`; with `dtype: float32` "
            "mergekit's result equals this one within 1 ulp" + (", up to the random masks" if result.seed is not None else "")
            + "). hf-metagpt runs it too: `hf-metagpt merge --recipe mergekit.yaml`.", "",
            "```yaml", text.rstrip("\n"), "```", ""]


def write_card(result: "MergeResult", folder: Path, *, licenses: list[str | None] | None = None,
               repo_id: str | None = None, geometry: "Geometry | None" = None, adapter: bool = False) -> Path:
    """Write README.md and the λ plot into `folder` (the merge's output); returns the card's path.

    With `geometry`, also the geometry section and its pictures (models named as in the card).
    """
    folder = Path(folder)
    figures: dict[str, str] = {}
    if not uses_lambdas(result.method):
        geometry = None
    from ..insight.plots import paused_gc

    with paused_gc():
        if geometry is not None:
            from ..insight.card import relabel
            from ..insight.plots import draw_all

            geometry = relabel(geometry, [short_name(m) for m in result.models])
            try:
                figures = {k: p.name for k, p in draw_all(geometry, folder, granularity=result.granularity,
                                                           bars=False).items()}
            except Exception as exc:  # a plot must never cost the merge
                log.warning("warning: could not draw the geometry plots (%s); the card has the text only", exc)
        plot = None
        if result.coefficients and uses_lambdas(result.method):
            try:
                plot_lambdas(result, folder / PLOT_FILE)
                plot = PLOT_FILE
            except Exception as exc:  # a plot must never cost the merge
                log.warning("warning: could not draw the λ plot (%s); the card has the table only", exc)
    card = build_card(result, licenses=licenses, repo_id=repo_id, plot=plot, geometry=geometry, figures=figures,
                      adapter=adapter)
    path = folder / CARD_FILE
    card.save(path)
    return path


def all_licenses(plan: "MergePlan", token: str | None = None) -> "list[str | License | None]":
    """License of every input (base first), from their cards; None where unknown; a custom licence
    (`license: other` with `license_name`/`license_link`) as a `License`."""
    out = []
    for info in plan.inputs:
        if info.ref.is_hub:
            out.append(read_license(info.ref, remote_files(info), token))
        else:
            out.append(local_license(info.ref.local_path))
    return out
