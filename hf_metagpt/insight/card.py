"""The card's sections that explain a merge: λ as bars, where each model changed the base, overlaps.

Pure text from `Geometry` values plus the file names of pictures drawn beside the card
(`plots.draw_all`); `card.build_card` places them. Models are named as the caller passes them:
Hub IDs, or a local folder's own name (`public_name`) — never a path of the merging machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .geometry import COSINE_LIMIT, SHARE_LIMIT, Geometry, Overlap

SECTION_TITLE = "## Task-vector geometry"
#: every per-tensor Gram matrix τi·τj of a merge, float64, beside the card (one compact file; T² per tensor)
GRAM_FILE = "metagpt_gram.npy"
MAX_MODELS_SHOWN = 12  # as plots.MAX_MODELS_SHOWN (the card's tables follow the pictures)
#: groups listed per model under "where each fine-tune changed the base".
TOP_GROUPS = 3


def public_name(ref: Any) -> str:
    """A model's name fit for a public card: its Hub ID, or a local folder's last path part."""
    repo = getattr(ref, "repo_id", None)
    if repo:
        return repo
    spec = str(getattr(ref, "spec", ref))
    return Path(spec.rstrip("/\\")).name or spec


def relabel(geometry: Geometry, names: Sequence[str]) -> Geometry:
    """The same geometry with other model names (e.g. `public_name`s for a card)."""
    if len(names) != len(geometry.models):
        raise ValueError(f"{len(names)} names for {len(geometry.models)} models")
    return replace(geometry, models=tuple(names))


def _cosine_table(geometry: Geometry) -> list[str]:
    t = len(geometry.models)
    cos = geometry.whole.cosines
    head = "| cosine | " + " | ".join(f"[{k + 1}]" for k in range(t)) + " |"
    lines = [head, "|---|" + "---:|" * t]
    for i, m in enumerate(geometry.models):
        lines.append(f"| [{i + 1}] `{m}` | " + " | ".join("1" if i == j and cos[i][j] == 1.0 else f"{cos[i][j]:+.3f}"
                                                           for j in range(t)) + " |")
    return lines


def _top_pairs_table(geometry: Geometry) -> list[str]:
    """Past MAX_MODELS_SHOWN models: the most similar pairs instead of the T×T matrix."""
    from .plots import top_pairs

    t = len(geometry.models)
    pairs = top_pairs(geometry)
    lines = [f"{t} fine-tunes make {t * (t - 1) // 2} pairs; the {len(pairs)} with the largest |cos| (overlaps "
             f"first). Every Gram matrix is in `{GRAM_FILE}`.", "",
             "| pair | cos, whole model | largest \\|cos\\| in a group |", "|---|---:|---|"]
    for i, j in pairs:
        c, g = max(((gram.cosine(i, j), name) for name, gram in geometry.layers.items()), key=lambda x: abs(x[0]),
                   default=(0.0, "-"))
        lines.append(f"| [{i + 1}] `{geometry.models[i]}` · [{j + 1}] `{geometry.models[j]}` | "
                     f"{geometry.whole.cosine(i, j):+.3f} | {c:+.3f} in `{g}` |")
    return lines


def _overlap_lines(geometry: Geometry, flagged: Sequence[Overlap]) -> list[str]:
    from .plots import MAX_PAIRS

    by_pair: dict[tuple[int, int], list[Overlap]] = {}
    for o in flagged:
        by_pair.setdefault((o.i, o.j), []).append(o)
    out = []
    if len(by_pair) > MAX_PAIRS:
        worst = sorted(by_pair, key=lambda p: -max(abs(o.cosine) for o in by_pair[p]))[:MAX_PAIRS]
        more = len(by_pair) - MAX_PAIRS
        by_pair = {p: by_pair[p] for p in worst}
        out_tail = [f"- … and {more} more pairs (every overlap is in `metagpt_coefficients.json`)"]
    else:
        out_tail = []
    for (i, j), found in by_pair.items():
        parts = []
        for o in sorted(found, key=lambda o: (o.group != "model", -o.share)):
            parts.append(f"whole model (cos {o.cosine:+.2f})" if o.group == "model"
                         else f"`{o.group}` (cos {o.cosine:+.2f}, {o.share:.0%} of their ‖τ‖²)")
        out.append(f"- `{geometry.models[i]}` and `{geometry.models[j]}`: " + ", ".join(parts))
    return out + out_tail


def _largest_pair(geometry: Geometry) -> tuple[float, str, int, int, float] | None:
    """The largest |cos| of any pair in any layer group, with the group's part of the pair's ‖τ‖²."""
    best = None
    t = len(geometry.models)
    whole = geometry.whole.sq_norms
    for g, gram in geometry.layers.items():
        for i in range(t):
            for j in range(i + 1, t):
                c = gram.cosine(i, j)
                if best is None or abs(c) > abs(best[0]):
                    denom = whole[i] + whole[j]
                    share = (gram.sq_norms[i] + gram.sq_norms[j]) / denom if denom > 0 else 0.0
                    best = (c, g, i, j, share)
    return best


def geometry_section(geometry: Geometry, *, granularity: str, figures: Mapping[str, str] | None = None,
                     lambdas: Sequence[float] | None = None, transformed: str | None = None) -> list[str]:
    """Markdown lines: the orthogonality check, its overlaps named, and where each model changed the base.

    Args:
        geometry: the merged inputs' geometry, models named for the public (`relabel`).
        granularity: the merge's granularity (the advice depends on it).
        figures: file names of the pictures beside the card, by kind (`plots.draw_all`'s keys).
        lambdas: the merge's whole-model λ, when its granularity is `model` (for the cross-term share).
        transformed: the transform (e.g. "DARE") whose output the task vectors are, when there is one.
    """
    figures = figures or {}
    whole = geometry.whole
    t = len(geometry.models)
    lines = [SECTION_TITLE, "",
             "MetaGPT's closed-form λ rest on two assumptions: local linearity, and task vectors that are "
             "orthogonal (τi·τj ≈ 0 for i ≠ j). The second is measured here, on the merged inputs: float64 dot "
             "products of every pair of task vectors, taken in the same read as the norms"
             + (f" (the task vectors after {transformed}, the ones the λ are computed from)." if transformed else ".")]
    if t < 2:
        lines += ["", "One fine-tune: there is no pair to check."]
    else:
        lines += ["", *(_cosine_table(geometry) if t <= MAX_MODELS_SHOWN else _top_pairs_table(geometry))]
        lam = list(lambdas) if lambdas is not None else list(whole.shares)
        cross = whole.cross_term_share(lam)
        lines += ["", f"With the whole-model λ, the cross terms τi·τj make up {cross:+.1%} of the merged update's "
                      "squared norm ‖Σ λt τt‖² (0 % for orthogonal task vectors; negative where they conflict)."]
        flagged = geometry.overlaps()
        lines += ["", f"**Overlaps** (|cos| > {COSINE_LIMIT} where a group holds ≥ {SHARE_LIMIT:.0%} of the pair's "
                      "squared norm; groups are blocks `layers.N` and the tensors outside them):", ""]
        if flagged:
            lines += _overlap_lines(geometry, flagged)
            advice = ("`--granularity layer` (a λ per block, so an overlap only weighs on its own blocks) and "
                      if granularity == "model" else "")
            lines += ["", "Where task vectors overlap, the merge applies their shared direction with the sum of "
                          "their λ (or cancels it where the cosine is negative), which the λ do not account for. "
                          f"Worth trying: {advice}`hf-metagpt compare` against methods that resolve conflicts "
                          "(ties, dare_ties)."]
        else:
            best = _largest_pair(geometry)
            lines.append("None: the orthogonality assumption holds for these inputs where it matters"
                         + (f" (largest |cos| in any group: {best[0]:+.2f} in `{best[1]}`, between "
                            f"[{best[2] + 1}] and [{best[3] + 1}], a group holding {best[4]:.1%} of their ‖τ‖²)."
                            if best else "."))
        if "cosines" in figures:
            lines += ["", f"![cosine of each pair of task vectors, whole model and per layer]({figures['cosines']})"]
    fractions = geometry.fractions("layer")
    lines += ["", "### Where each fine-tune changed the base", "",
              "Each model's squared task-vector norm ‖τt‖², split over the layers (each row sums to 1):", ""]
    listed = geometry.models if t <= 2 * MAX_MODELS_SHOWN else geometry.models[:2 * MAX_MODELS_SHOWN]
    for k, m in enumerate(listed):
        if whole.sq_norms[k] == 0.0:
            lines.append(f"- `{m}`: equal to the base everywhere")
            continue
        top = sorted(fractions, key=lambda g: -fractions[g][k])[:TOP_GROUPS]
        lines.append(f"- `{m}`: " + ", ".join(f"{fractions[g][k]:.0%} in `{g}`"
                                             for g in top))
    if len(listed) < t:
        lines.append(f"- … and {t - len(listed)} more fine-tunes (every norm per tensor is in `{GRAM_FILE}`)")
    if "layer_shares" in figures:
        lines += ["", f"![share of each model's ‖τ‖² per layer]({figures['layer_shares']})"]
    return lines
