"""Pictures of the task-vector geometry: λ bars, where each model changed the base, cosines.

Drawn on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no global backend
switch, nothing left open. Sized for the Hub's card column (about 800 px): figures are 8.5 in
wide at 120 dpi (1020 px, scaled down a little), fonts 9–11 pt, labels thinned on long models.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from .geometry import COSINE_LIMIT, Geometry

LAMBDA_BARS = "metagpt_lambda_bars.png"
LAYER_SHARES = "metagpt_layer_shares.png"
COSINES = "metagpt_cosines.png"
WIDTH_IN = 8.5
DPI = 120
#: at most this many x labels on a per-layer axis (every k-th block otherwise).
MAX_XLABELS = 36
#: past this many models the pictures show a selection (D15: their cost grows with T²): cosine
#: values written in the matrix, one line per pair, one labelled row per model
MAX_MODELS_SHOWN = 12
#: at most this many pairs get a line in the per-layer cosine plot (the largest |cos| first)
MAX_PAIRS = 10
_NAME_CHARS = 30


def short_group(group: str) -> str:
    """A short axis label: `layers.12` → `12`, `model.embed_tokens.weight` → `embed_tokens`."""
    if group.startswith("layers."):
        return group[len("layers."):]
    parts = group.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1]


def short_name(name: str, limit: int = _NAME_CHARS) -> str:
    """A model name that fits a label: a pinned commit cut to 7 characters, the middle elided past `limit`."""
    repo, at, rev = name.partition("@")
    if at and len(rev) > 12:
        name = f"{repo}@{rev[:7]}"
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2):]


def preload() -> threading.Thread:
    """Import what the card needs on a thread, started while a merge runs so the card does not
    wait for it at the end (the caller joins it before drawing): matplotlib's figure and Agg canvas
    (about 0.4 s of CPU) and huggingface_hub's ModelCard (0.17 s: it brings the Hub client)."""
    def load() -> None:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # drawing later raises the same error where it is handled
            pass
        try:
            from huggingface_hub import ModelCard  # noqa: F401
        except Exception:  # the card raises the same error where it is handled
            pass

    thread = threading.Thread(target=load, name="hf-metagpt-import-plots", daemon=True)
    thread.start()
    return thread


def _figure(height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def top_pairs(geometry: Geometry, limit: int = MAX_PAIRS) -> list[tuple[int, int]]:
    """The `limit` pairs (i < j) with the largest |cos| in any layer group or the whole model, flagged
    overlaps first: the ones a reader must see when there are too many pairs to draw them all."""
    t = len(geometry.models)
    flagged = {(o.i, o.j) for o in geometry.overlaps()}
    grams = [geometry.whole, *geometry.layers.values()]
    score = {(i, j): max(abs(g.cosine(i, j)) for g in grams) for i in range(t) for j in range(i + 1, t)}
    return sorted(score, key=lambda p: (p not in flagged, -score[p], p))[:limit]


def _model_axis(ax, names: Sequence[str]) -> None:
    """One row per model, labelled while they fit (every k-th past MAX_MODELS_SHOWN * 2)."""
    step = max(1, -(-len(names) // (2 * MAX_MODELS_SHOWN)))
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks, labels=[short_name(names[k]) for k in ticks], fontsize=10 if step == 1 and len(names) <= 12 else 7)


def _group_axis(ax, groups: Sequence[str], flagged: set[str]) -> None:
    step = max(1, -(-len(groups) // MAX_XLABELS))
    # Every step-th block by its own number, every tensor outside the blocks, every flagged group.
    ticks = [k for k, g in enumerate(groups)
             if not g.startswith("layers.") or g in flagged or not g[len("layers."):].isdigit()
             or int(g[len("layers."):]) % step == 0]
    ax.set_xticks(ticks, labels=[short_group(groups[k]) for k in ticks], rotation=90, fontsize=8)
    for k, label in zip(ticks, ax.get_xticklabels()):
        if groups[k] in flagged:  # groups the overlap rule names: the same red as the warning's
            label.set_color("#c0392b")
            label.set_fontweight("bold")
    ax.set_xlabel("block (layers.N) or tensor outside the blocks" + ("; red: overlap" if flagged else ""), fontsize=9)


def plot_lambda_bars(models: Sequence[str], lambdas: Sequence[float], path: Path, *,
                     title: str = "MetaGPT λ per model (granularity model)") -> Path:
    """One horizontal bar per model with its λ written beside it."""
    total = len(models)
    if total > 2 * MAX_MODELS_SHOWN:  # the largest λ only: a bar per model stops being readable
        keep = sorted(range(total), key=lambda k: -lambdas[k])[:2 * MAX_MODELS_SHOWN]
        models, lambdas = [models[k] for k in keep], [lambdas[k] for k in keep]
        title += f" — the {len(keep)} largest of {total}"
    fig = _figure(1.3 + 0.42 * len(models))
    ax = fig.add_subplot()
    y = list(range(len(models)))[::-1]
    ax.barh(y, lambdas, color="#3b6ea8", height=0.6)
    ax.set_yticks(y, labels=[short_name(m) for m in models], fontsize=10)
    top = max([1.0, *lambdas])
    ax.set_xlim(0, top * 1.12)
    for yi, v in zip(y, lambdas):
        ax.text(v + top * 0.01, yi, f"{v:.4f}", va="center", fontsize=10)
    ax.set_xlabel("λ = ‖τt‖² / Σk ‖τk‖²", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_layer_shares(geometry: Geometry, path: Path) -> Path:
    """Heatmap, one row per model: the part of its ‖τt‖² in each layer group (rows sum to 1)."""
    import numpy as np

    fractions = geometry.fractions("layer")
    groups = list(fractions)
    data = np.array([[fractions[g][k] for g in groups] for k in range(len(geometry.models))], dtype=float)
    flagged = {o.group for o in geometry.overlaps() if o.group != "model"}
    fig = _figure(2.2 + min(0.42 * len(geometry.models), 10.0))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0.0, vmax=max(1e-12, float(data.max(initial=0.0))),
                   interpolation="nearest")
    _model_axis(ax, geometry.models)
    _group_axis(ax, groups, flagged)
    if data.size <= 48:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 * data.max() else "white")
    ax.set_title("Where each fine-tune changed the base: share of its ‖τ‖² per layer", fontsize=11)
    fig.colorbar(im, ax=ax, label="share of ‖τt‖²", fraction=0.04, pad=0.01)
    return _save(fig, path)


def plot_cosines(geometry: Geometry, path: Path) -> Path | None:
    """Whole-model cosine matrix, and each pair's cosine per layer group (None for one model)."""
    import numpy as np

    t = len(geometry.models)
    if t < 2:
        return None
    whole = np.array(geometry.whole.cosines, dtype=float)
    layers = geometry.layers
    groups = list(layers)
    flagged = {o.group for o in geometry.overlaps() if o.group != "model"}
    shown = min(t, MAX_MODELS_SHOWN)
    fig = _figure(3.6 + 0.15 * shown + (0.2 * shown if shown > 3 else 0.0))
    left, right = fig.subplots(1, 2, width_ratios=[1, 2.4])
    im = left.imshow(whole, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    step = max(1, -(-t // MAX_MODELS_SHOWN))
    ticks = list(range(0, t, step))
    left.set_xticks(ticks, labels=[f"[{k + 1}]" for k in ticks], fontsize=10 if t <= 4 else 7,
                    rotation=90 if t > MAX_MODELS_SHOWN else 0)
    left.set_yticks(ticks, labels=[f"[{k + 1}]" for k in ticks], fontsize=10 if t <= 4 else 7)
    if t <= MAX_MODELS_SHOWN:  # the values themselves while they fit their cells
        for i in range(t):
            for j in range(t):
                left.text(j, i, f"{whole[i, j]:+.2f}", ha="center", va="center", fontsize=9 if t <= 4 else 7,
                          color="white" if abs(whole[i, j]) > 0.6 else "black")
    left.set_title("cosine, whole model", fontsize=10)
    fig.colorbar(im, ax=left, fraction=0.046, pad=0.04)
    x = np.arange(len(groups))
    right.axhspan(-COSINE_LIMIT, COSINE_LIMIT, color="#eeeeee", zorder=0)
    pairs = top_pairs(geometry)
    for i, j in pairs:
        right.plot(x, [layers[g].cosine(i, j) for g in groups], marker="o", markersize=3, linewidth=1.2,
                   label=f"[{i + 1}]·[{j + 1}]")
    right.set_ylim(-1.05, 1.05)
    right.axhline(0.0, color="#888888", linewidth=0.6)
    right.set_ylabel("cosine", fontsize=10)
    every = t * (t - 1) // 2
    right.set_title(f"cosine per layer (grey: |cos| ≤ {COSINE_LIMIT})"
                    + (f"\nthe {len(pairs)} of {every} pairs with the largest |cos|" if len(pairs) < every else ""),
                    fontsize=10)
    _group_axis(right, groups, flagged)
    right.legend(fontsize=8, ncols=min(3, len(pairs)), loc="best")
    key = [f"[{k + 1}] {short_name(m)}" for k, m in enumerate(geometry.models)]
    if t > MAX_MODELS_SHOWN:  # a key of every model would outgrow the picture
        key = [f"[k]: fine-tune k of the card's inputs table ({t} fine-tunes)"]
    # One line while it fits the figure's width, else one model per line.
    fig.suptitle("   ".join(key) if sum(len(k) + 3 for k in key) <= 95 else "\n".join(key), fontsize=10)
    return _save(fig, path)


def draw_all(geometry: Geometry, folder: Path, *, granularity: str = "model",
             lambdas: Sequence[float] | None = None, bars: bool | None = None) -> dict[str, Path]:
    """Every picture into `folder`: λ bars (model granularity, or `bars=True`), layer shares, cosines.

    `lambdas` are the merge's model-level λ (default: what the geometry gives).
    Returns {"lambda_bars" | "layer_shares" | "cosines": path} for the pictures drawn.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if bars if bars is not None else granularity == "model":
        lam = list(lambdas) if lambdas is not None else list(geometry.whole.shares)
        out["lambda_bars"] = plot_lambda_bars(geometry.models, lam, folder / LAMBDA_BARS)
    out["layer_shares"] = plot_layer_shares(geometry, folder / LAYER_SHARES)
    cos = plot_cosines(geometry, folder / COSINES)
    if cos is not None:
        out["cosines"] = cos
    return out
