"""Pictures of the task-vector geometry: λ bars, where each model changed the base, cosines.

Drawn on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no global backend
switch, nothing left open. Sized for the Hub's card column (about 800 px): figures are 8.5 in
wide at 120 dpi (1020 px, scaled down a little), fonts 9–11 pt, labels thinned on long models.
No layout engine: each figure's margins are measured once from its own labels (`fit_margins`).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
#: zlib level of the PNGs: 3 encodes them in 30 % less time than the default 6 (12.6 vs 18.1 ms for the
#: 1.1B cosine picture), 4 % larger
PNG_COMPRESSION = 3
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
    (0.26–0.46 s of CPU) and huggingface_hub's ModelCard (0.17–0.30 s: it brings the Hub client).
    It holds the interpreter lock against the merge's threads meanwhile (docs/hardware.md)."""
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


def new_figure(height: float, width: float = WIDTH_IN, dpi: int = DPI):
    """A bare figure on the Agg canvas, without a layout engine: `fit_margins` sets its margins once from the
    texts they hold (constrained layout measured every tick label twice per save: most of a picture's
    cost)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """Write `fig` as a PNG at its own dpi (one draw: no layout engine, no tight bounding box)."""
    path = Path(path)
    fig.savefig(path, dpi=fig.dpi, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


_PT = 1 / 72  # inches per point
_PAD = 5 * _PT  # around the figure and between neighbours
_CBAR_W = 0.17  # a colorbar's width, inches
_CBAR_GAP = 0.09  # between a heatmap and its colorbar, inches


def _widest(fig, texts) -> tuple[float, float]:
    """The widest line of the visible Text artists `texts` and one line's height, in inches, as Agg lays
    them out. Only the three longest strings are measured: in a proportional font they hold the widest."""
    renderer = fig.canvas.get_renderer()
    lines = [(line, t.get_fontproperties()) for t in texts if t.get_visible() and t.get_text()
             for line in t.get_text().split("\n")]
    if not lines:
        return 0.0, 0.0
    longest = sorted(lines, key=lambda lp: -len(lp[0]) * lp[1].get_size_in_points())[:3]
    width = max(renderer.get_text_width_height_descent(line, prop, ismath=False)[0] for line, prop in longest)
    height = renderer.get_text_width_height_descent("lp", longest[0][1], ismath=False)[1]
    return width / fig.dpi, height / fig.dpi


def _height(fig, text) -> float:
    """Inches a (possibly multi-line) Text artist takes across its baseline; 0 when it shows nothing."""
    if not text.get_visible() or not text.get_text():
        return 0.0
    lines = text.get_text().count("\n")
    return _widest(fig, [text])[1] * (1 + 1.2 * lines)  # matplotlib's default line spacing


def _outside(fig, ax) -> tuple[float, float, float, float]:
    """Inches that an axes' tick labels, axis labels and title take outside its box: left, bottom, right,
    top (right: a colorbar's ticks and label)."""
    import matplotlib as mpl

    def ticks(axis, name: str) -> float:
        labels = [t for t in axis.get_ticklabels() if t.get_text()]
        if not labels:
            return 0.0
        width, height = _widest(fig, labels)
        along = width if (name == "x") == (abs(labels[0].get_rotation() % 180 - 90) < 1) else height
        return along + (mpl.rcParams[f"{name}tick.major.size"] + mpl.rcParams[f"{name}tick.major.pad"]) * _PT

    def label(axis) -> float:
        h = _height(fig, axis.label)
        return h + axis.labelpad * _PT if h else 0.0

    y = ticks(ax.yaxis, "y") + label(ax.yaxis)
    left, right = (0.0, y) if ax.yaxis.get_ticks_position() == "right" else (y, 0.0)
    bottom = ticks(ax.xaxis, "x") + label(ax.xaxis)
    title = _height(fig, ax.title)
    top = title + mpl.rcParams["axes.titlepad"] * _PT if title else 0.0
    return left, bottom, right, top


def _place(fig, ax, x0: float, y0: float, x1: float, y1: float) -> None:
    """Put `ax` at [x0, x1] × [y0, y1], inches from the figure's lower left corner."""
    w, h = fig.get_size_inches()
    ax.set_position([x0 / w, y0 / h, max(x1 - x0, 0.1) / w, max(y1 - y0, 0.1) / h])


def fit_margins(fig, ax, cax=None, *, right_pad: float = 0.0, box: tuple[float, float] | None = None) -> None:
    """Margins of a one-axes figure (and its colorbar `cax` on the right), measured once.

    `box`: the axes' own (width, height) in inches, the figure resized around it; else the figure's
    size is kept and the axes take what the margins leave.
    """
    left, bottom, right, top = _outside(fig, ax)
    w, h = fig.get_size_inches()
    if box is not None:
        h = 2 * _PAD + bottom + box[1] + top
        fig.set_size_inches(w, h)
    y0, y1 = _PAD + bottom, h - _PAD - top
    if cax is not None:  # its tick labels (their number, their decimals) follow its final height
        _place(fig, cax, 0.0, y0, _CBAR_W, y1)
        right += _CBAR_GAP + _CBAR_W + _outside(fig, cax)[2]
    right += right_pad
    if box is not None:
        w = 2 * _PAD + left + box[0] + right
        fig.set_size_inches(w, h)
    x1 = w - _PAD - right
    _place(fig, ax, _PAD + left, y0, x1, y1)
    if cax is not None:
        _place(fig, cax, x1 + _CBAR_GAP, y0, x1 + _CBAR_GAP + _CBAR_W, y1)


def add_colorbar(fig, im, **kw):
    """A colorbar on its own axes, placed by `fit_margins` (no space stolen by a layout engine)."""
    cax = fig.add_axes((0.9, 0.1, 0.02, 0.8))
    fig.colorbar(im, cax=cax, **kw)
    return cax


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
    fig = new_figure(1.3 + 0.42 * len(models))
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
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
    # The values sit inside the axes (x up to 1.12 × the longest bar); the right end's tick label overhangs.
    fit_margins(fig, ax, right_pad=_widest(fig, ax.get_xticklabels()[-1:])[0] / 2)
    return save_png(fig, path)


def plot_layer_shares(geometry: Geometry, path: Path) -> Path:
    """Heatmap, one row per model: the part of its ‖τt‖² in each layer group (rows sum to 1)."""
    import numpy as np

    fractions = geometry.fractions("layer")
    groups = list(fractions)
    data = np.array([[fractions[g][k] for g in groups] for k in range(len(geometry.models))], dtype=float)
    flagged = {o.group for o in geometry.overlaps() if o.group != "model"}
    fig = new_figure(2.2 + min(0.42 * len(geometry.models), 10.0))
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
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
    fit_margins(fig, ax, add_colorbar(fig, im, label="share of ‖τt‖²"))
    return save_png(fig, path)


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
    fig = new_figure(3.6 + 0.15 * shown + (0.2 * shown if shown > 3 else 0.0))
    left, right = fig.add_axes((0.05, 0.1, 0.2, 0.8)), fig.add_axes((0.4, 0.1, 0.55, 0.8))
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
    cax = add_colorbar(fig, im)
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
    title = fig.suptitle("   ".join(key) if sum(len(k) + 3 for k in key) <= 95 else "\n".join(key), fontsize=10,
                 y=1 - _PAD / fig.get_size_inches()[1])
    _fit_pair(fig, left, cax, right, title)
    return save_png(fig, path)


def _fit_pair(fig, left, cax, right, title) -> None:
    """The cosine picture's margins: the whole-model matrix as a square with its colorbar, beside the
    per-layer lines; the two boxes share the width 1 : 2.4 (as `width_ratios` did), under the title."""
    w, h = fig.get_size_inches()
    bar, gap = 0.6 * _CBAR_W, _CBAR_GAP
    top = h - _PAD - (_height(fig, title) + _PAD if title.get_text() else 0.0)
    l_left, l_bottom, _, l_top = _outside(fig, left)
    c_right = _outside(fig, cax)[2]
    r_left, r_bottom, _, r_top = _outside(fig, right)
    end = w - _PAD - _widest(fig, right.get_xticklabels()[-1:])[1] / 2  # the last label's half overhangs
    boxes = end - 3 * _PAD - l_left - gap - bar - c_right - r_left  # what the two boxes share
    y0, y1 = _PAD + r_bottom, top - r_top  # the lines' box; the square is centred beside it
    side = min(boxes / 3.4, top - l_top - _PAD - l_bottom)
    sy = min(max((y0 + y1 - side) / 2, _PAD + l_bottom), top - l_top - side)
    x0 = _PAD + l_left
    _place(fig, left, x0, sy, x0 + side, sy + side)
    _place(fig, cax, x0 + side + gap, sy, x0 + side + gap + bar, sy + side)
    _place(fig, right, x0 + side + gap + bar + c_right + 2 * _PAD + r_left, y0, end, y1)


def draw_all(geometry: Geometry, folder: Path, *, granularity: str = "model",
             lambdas: Sequence[float] | None = None, bars: bool | None = None) -> dict[str, Path]:
    """Every picture into `folder`: λ bars (model granularity, or `bars=True`), layer shares, cosines.

    `lambdas` are the merge's model-level λ (default: what the geometry gives).
    Returns {"lambda_bars" | "layer_shares" | "cosines": path} for the pictures drawn.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    with paused_gc():
        if bars if bars is not None else granularity == "model":
            lam = list(lambdas) if lambdas is not None else list(geometry.whole.shares)
            out["lambda_bars"] = plot_lambda_bars(geometry.models, lam, folder / LAMBDA_BARS)
        out["layer_shares"] = plot_layer_shares(geometry, folder / LAYER_SHARES)
        cos = plot_cosines(geometry, folder / COSINES)
        if cos is not None:
            out["cosines"] = cos
    return out


@contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic collector off while pictures are drawn, as it was after.

    A figure allocates some 10⁴ objects that live until it is saved; in a merge's process (torch
    loaded: ~2·10⁵ tracked objects) they set off collections that scan the whole heap — 0.13–0.25 s
    each, one every card or two, 10 ms of younger ones per card besides. Paused, the figures are
    garbage in the youngest generation when it resumes, and the next collection of it frees them
    (10 ms for a card's 3·10⁴ objects).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
