"""The card's pictures, laid out once by measured margins (no layout engine): every label inside the
picture, no two panels' labels on top of each other, every block labelled while they fit, the PNG sized
as the figure says, for the model sizes users merge (1.1B: 22 blocks, 7B: 32, 70B: 80; 1 to 40 models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_metagpt.engine.stats import StreamStats
from hf_metagpt.insight import plots
from hf_metagpt.insight.geometry import Geometry
from hf_metagpt.publish import card
from hf_metagpt.result import MergeResult
from hf_metagpt.sources.refs import ModelRef

BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def llama_geometry(blocks: int, t: int, *, name: str = "org/llama-ft-{k}-instruct") -> Geometry:
    """Gram matrices of random task vectors with Llama's tensor names; fine-tunes 1 and 2 overlap in
    block 1 and lm_head (block 1 flagged: its label drawn red and bold)."""
    rng = np.random.default_rng(blocks * 100 + t)
    names = (["model.embed_tokens.weight"] + [f"model.layers.{n}.{p}.weight" for n in range(blocks) for p in BLOCK]
             + ["model.norm.weight", "lm_head.weight"])
    entries = []
    for tensor in names:
        x = rng.standard_normal((t, 32))
        if t > 1 and (".layers.1." in tensor or tensor == "lm_head.weight"):
            x[1] = x[0] + 0.2 * x[1]
            x *= (2 * blocks + 2) ** 0.5  # each holds a fair part of the norms: the overlap rule flags it
        entries.append((tensor, (x @ x.T).tolist()))
    return Geometry.from_tensors([name.format(k=k) for k in range(t)], entries)


def merge_result(geo: Geometry, granularity: str) -> MergeResult:
    base = ModelRef(spec="org/base", repo_id="org/base", sha="a" * 40)
    models = [ModelRef(spec=m, repo_id=m, sha="b" * 40) for m in geo.models]
    return MergeResult(output=None, base=base, models=models, method="metagpt", parameters={},
                       granularity=granularity, seed=None, coefficients=geo.lambdas(granularity),
                       sq_norms={}, stats=StreamStats(), recipe="")


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved, with the path it went to."""
    saved: list[tuple[object, Path]] = []
    real = plots.save_png

    def keep(fig, path):
        out = real(fig, path)
        saved.append((fig, Path(path)))
        return out

    monkeypatch.setattr(plots, "save_png", keep)
    return saved


def check_layout(fig, path: Path) -> dict[str, list[str]]:
    """Asserts the PNG decodes at the figure's size, that every panel's drawn texts (tick labels, axis
    labels, titles) lie inside it and that no two panels' texts overlap; returns each panel's tick labels."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
    fw, fh = fig.get_size_inches() * fig.dpi
    assert (w, h) == (int(fw), int(fh)), path.name  # Agg truncates to whole pixels
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    title = fig.get_suptitle() and fig.texts[0].get_window_extent(renderer)
    for box in boxes + ([title] if title else []):
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= w + 0.5 and box.y1 <= h + 0.5, (path.name, box)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:] + ([title] if title else []):
            assert not a.overlaps(b), (path.name, a, b)
    return {f"{k}{axis}": [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_text()]
            for k, ax in enumerate(fig.axes) for axis in "xy"}


@pytest.mark.parametrize(("blocks", "t", "granularity"), [
    (22, 3, "layer"), (22, 3, "model"), (32, 5, "model"), (80, 5, "layer"), (80, 2, "model"), (4, 1, "model"),
    (32, 13, "layer"), (80, 40, "model"),
])
def test_every_picture_keeps_its_labels_inside_and_apart(tmp_path, figures, blocks, t, granularity):
    geo = llama_geometry(blocks, t)
    assert t < 2 or "layers.1" in {o.group for o in geo.overlaps()}
    card.plot_lambdas(merge_result(geo, granularity), tmp_path / card.PLOT_FILE)
    out = plots.draw_all(geo, tmp_path, granularity=granularity, bars=False)
    assert set(out) == ({"layer_shares", "cosines"} if t > 1 else {"layer_shares"})
    assert len(figures) == 1 + len(out)
    blocks_shown = {str(n) for n in range(blocks)}
    for fig, path in figures:
        ticks = check_layout(fig, path)
        if path.name == card.PLOT_FILE and granularity == "model":
            assert fig.get_size_inches()[0] * fig.dpi == 1020  # the bars, at the card column's width
            assert len(ticks["0y"]) == min(t, 2 * plots.MAX_MODELS_SHOWN)
            continue
        if path.name != plots.COSINES:  # the heatmaps: a row per model, labelled while they fit
            assert ticks["0y"][:1] == [plots.short_name(geo.models[0])]
            assert len(ticks["0y"]) == (t if t <= 2 * plots.MAX_MODELS_SHOWN else len(range(0, t, 2)))
        xs = set(ticks["0x"] if path.name != plots.COSINES else ticks["1x"])  # cosines: the per-layer panel
        assert {"embed_tokens", "norm", "lm_head"} <= xs, path.name
        assert "0" in xs or path.name == card.PLOT_FILE  # the λ heatmap thins by column, from embed_tokens
        if blocks <= plots.MAX_XLABELS:  # every block by its number while they fit
            assert blocks_shown <= xs, path.name
        else:
            if path.name != card.PLOT_FILE:  # every group an overlap names keeps its label
                assert {plots.short_group(o.group) for o in geo.overlaps() if o.group != "model"} <= xs
            assert len(xs) <= plots.MAX_XLABELS + 4


def test_long_names_widen_the_margin_not_the_heatmap_past_the_figure(tmp_path, figures):
    geo = llama_geometry(22, 3, name="organisation-{k}/a-rather-long-fine-tune-name-of-model-{k}")
    plots.plot_layer_shares(geo, tmp_path / plots.LAYER_SHARES)
    ((fig, path),) = figures
    check_layout(fig, path)
    short = llama_geometry(22, 3, name="o/m{k}")
    plots.plot_layer_shares(short, tmp_path / "short.png")
    (long_ax, _), (short_ax, _) = figures[0][0].axes, figures[1][0].axes
    # The names (30 characters, middle elided) take their width from the heatmap, measured: not a guess.
    assert long_ax.get_position().x0 > short_ax.get_position().x0 + 0.15
    assert long_ax.get_position().x1 == pytest.approx(short_ax.get_position().x1)


def test_the_collector_is_paused_while_drawing_and_left_as_it_was(tmp_path, monkeypatch):
    import gc

    enabled: list[bool] = []
    real = plots.save_png

    def save(fig, path):
        enabled.append(gc.isenabled())
        if len(enabled) == 2:
            raise RuntimeError("disk full")
        return real(fig, path)

    monkeypatch.setattr(plots, "save_png", save)
    geo = llama_geometry(4, 3)
    assert gc.isenabled()
    readme = card.write_card(merge_result(geo, "layer"), tmp_path, geometry=geo)
    assert enabled == [False, False, False] and gc.isenabled()  # on again, after a picture failed too
    text = readme.read_text()
    assert "## Task-vector geometry" in text and f"]({plots.COSINES})" not in text  # text only, as before
    assert f"![λ per group and model]({card.PLOT_FILE})" in text
    gc.disable()
    try:  # a caller that turned it off keeps it off
        plots.draw_all(geo, tmp_path / "again")
        assert not gc.isenabled()
    finally:
        gc.enable()
