"""Geometry pictures (rendered, sized, labelled) and the card's sections built from geometry values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_metagpt.publish.card import PLOT_FILE, build_card, write_card
from hf_metagpt.insight import plots
from hf_metagpt.insight.card import SECTION_TITLE, geometry_section, public_name, relabel
from hf_metagpt.insight.geometry import Geometry, Gram
from hf_metagpt.sources.refs import ModelRef
from hf_metagpt.result import MergeResult
from hf_metagpt.engine.stats import StreamStats

NAMES = ["org/chat", "org/math", "org/code"]


def geometry(n_layers: int = 4, overlap: bool = True) -> Geometry:
    """Per-tensor Gram matrices of constructed task vectors (rows of X): chat and math share lm_head."""
    g = torch.Generator().manual_seed(0)
    names = (["model.embed_tokens.weight"] + [f"model.layers.{n}.mlp.up_proj.weight" for n in range(n_layers)]
             + ["model.norm.weight", "lm_head.weight"])
    entries = []
    for name in names:
        x = torch.randn(3, 400, generator=g, dtype=torch.float64)
        if overlap and name == "lm_head.weight":
            x[1] = x[0] + 0.1 * x[1]
            x *= 4
        entries.append((name, x @ x.t()))
    return Geometry.from_tensors(NAMES, entries)


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_pictures_render_at_the_hub_width_with_their_labels(tmp_path, monkeypatch):
    labels: list[str] = []
    real_save = plots.save_png

    def spy(fig, path):  # every text the figure draws, to check labels without OCR
        fig.canvas.draw()
        labels.extend(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")) if t.get_text())
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save_png", spy)
    geo = geometry(n_layers=32)
    out = plots.draw_all(geo, tmp_path, granularity="model")
    assert set(out) == {"lambda_bars", "layer_shares", "cosines"}
    for kind, path in out.items():
        w, h = _png(path)
        # 8.5 in at 120 dpi: wide enough to read on the Hub's ~800 px column, not so wide it shrinks much.
        assert w == int(plots.WIDTH_IN * plots.DPI), kind
        assert 150 < h < 700, kind
    text = " ".join(labels)
    for name in NAMES:
        assert name in text
    lam = geo.whole.shares
    for v in lam:
        assert f"{v:.4f}" in labels  # bar values written beside the bars
    for label in ("embed_tokens", "0", "31", "norm", "lm_head", "cosine, whole model", "share of ‖τt‖²"):
        assert label in labels, label
    assert f"{geo.whole.cosine(0, 1):+.2f}" in labels


def test_overlapping_layers_are_marked_red_on_the_axis(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = list(geometry().layers)
    plots._group_axis(ax, groups, {"lm_head.weight"})
    colors = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert colors["lm_head"] == "#c0392b" and colors["norm"] != "#c0392b"


def test_long_models_thin_block_labels_but_keep_outside_tensors():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = list(geometry(n_layers=80).layers)
    plots._group_axis(ax, groups, {"layers.41"})
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert len(shown) <= plots.MAX_XLABELS + 4
    assert {"embed_tokens", "norm", "lm_head", "41", "0"} <= set(shown)


def test_one_model_draws_no_cosine_picture_and_names_are_shortened(tmp_path):
    g = Geometry(("only",), (("model.layers.0.x", Gram(((2.0,),))),))
    out = plots.draw_all(g, tmp_path)
    assert set(out) == {"lambda_bars", "layer_shares"}
    assert plots.short_name("meta-llama/Llama-2-7b-chat-hf@08751db2aca9bf2f7f80d2e516117a53d7450235") \
        == "meta-llama/Lla…chat-hf@08751db"
    assert [plots.short_group(x) for x in ("layers.7", "model.embed_tokens.weight", "lm_head.weight")] \
        == ["7", "embed_tokens", "lm_head"]


def test_geometry_section_names_overlaps_and_where_models_changed_the_base():
    geo = geometry()
    lines = geometry_section(geo, granularity="model", figures={"cosines": "c.png", "layer_shares": "s.png"})
    text = "\n".join(lines)
    assert lines[0] == SECTION_TITLE
    assert "orthogonal" in text
    c = geo.whole.cosines
    assert f"| [1] `org/chat` | 1 | {c[0][1]:+.3f} | {c[0][2]:+.3f} |" in text
    assert re.search(r"- `org/chat` and `org/math`: whole model \(cos \+0\.\d\d\), `lm_head.weight` \(cos \+[01]\.\d\d, \d+% of their", text)
    assert "`--granularity layer`" in text and "`hf-metagpt compare`" in text
    assert "![cosine of each pair of task vectors, whole model and per layer](c.png)" in text
    assert "![share of each model's ‖τ‖² per layer](s.png)" in text
    fr = geo.fractions()["lm_head.weight"][0]
    assert f"- `org/chat`: {fr:.0%} in `lm_head.weight`" in text
    lam = geo.whole.shares
    assert f"{geo.whole.cross_term_share(lam):+.1%}" in text
    # At layer granularity the advice drops the granularity switch.
    assert "--granularity layer" not in "\n".join(geometry_section(geo, granularity="layer"))


def test_geometry_section_says_when_the_assumption_holds():
    geo = geometry(overlap=False)
    text = "\n".join(geometry_section(geo, granularity="model"))
    assert "None: the orthogonality assumption holds for these inputs where it matters (largest |cos|" in text
    best = max(((abs(gram.cosine(i, j)), g, i, j) for g, gram in geo.layers.items() for i in range(3)
                for j in range(i + 1, 3)))
    gram = geo.layers[best[1]]
    share = (gram.sq_norms[best[2]] + gram.sq_norms[best[3]]) / (geo.whole.sq_norms[best[2]] + geo.whole.sq_norms[best[3]])
    assert (f"{gram.cosine(best[2], best[3]):+.2f} in `{best[1]}`, between [{best[2] + 1}] and [{best[3] + 1}], "
            f"a group holding {share:.1%} of their ‖τ‖²)") in text
    assert "![" not in text  # no figures passed, none linked


def _result(granularity: str, coefficients: dict[str, list[float]]) -> MergeResult:
    base = ModelRef(spec="org/base", repo_id="org/base", sha="a" * 40)
    models = [ModelRef(spec=n, repo_id=n, sha="b" * 40) for n in NAMES[:2]]
    models.append(ModelRef(spec="/home/someone/models/code-ft/", local_path=Path("/home/someone/models/code-ft")))
    recipe = ("base: org/base@" + "a" * 40 + "\nmodels:\n- org/chat@" + "b" * 40 + "\n- org/math@" + "b" * 40
              + "\n- code-ft\n")  # as api.public_recipe writes it
    return MergeResult(output=Path("/home/someone/merges/out"), base=base, models=models, method="metagpt",
                       parameters={}, granularity=granularity, seed=None, coefficients=coefficients,
                       sq_norms={g: [1.0, 2.0, 3.0] for g in coefficients}, stats=StreamStats(), recipe=recipe)


def test_write_card_draws_bars_at_model_granularity_and_the_geometry_without_local_paths(tmp_path):
    geo = geometry()
    result = _result("model", {"model": list(geo.whole.shares)})
    result.warnings.append("/home/someone/models/code-ft/ contributes almost nothing")
    result.notes.append("lm_head.weight: rows 5..9 of /home/someone/models/code-ft/ dropped")
    write_card(result, tmp_path, geometry=geo)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"README.md", PLOT_FILE, plots.LAYER_SHARES, plots.COSINES} <= files
    assert plots.LAMBDA_BARS not in files  # the bars are the λ plot itself
    w, h = _png(tmp_path / PLOT_FILE)
    assert w == int(plots.WIDTH_IN * plots.DPI) and h < 400  # bars, not a one-column heatmap
    card = (tmp_path / "README.md").read_text()
    from hf_metagpt import __version__

    assert f"hf-metagpt {__version__}" in card
    assert f"![MetaGPT λ of each model]({PLOT_FILE})" in card
    assert SECTION_TITLE in card and f"]({plots.COSINES})" in card and f"]({plots.LAYER_SHARES})" in card
    # The local input is named by its folder (table, geometry, recipe), never by the machine's path.
    section = card.split(SECTION_TITLE, 1)[1]
    assert "`code-ft`" in section and "/home/someone" not in card
    assert "| fine-tune 3 | `code-ft` (local folder) | — |" in card
    assert "- code-ft contributes almost nothing" in card and "rows 5..9 of code-ft dropped" in card
    assert "- code-ft\n```" in card and "- org/chat@" + "b" * 40 in card
    assert public_name(result.models[2]) == "code-ft" and public_name(result.models[0]) == "org/chat"


def test_card_at_layer_granularity_keeps_the_heatmap_and_adds_the_section(tmp_path):
    geo = geometry()
    result = _result("layer", geo.lambdas("layer"))
    write_card(result, tmp_path, geometry=geo)
    card = (tmp_path / "README.md").read_text()
    assert f"![λ per group and model]({PLOT_FILE})" in card
    assert "`--granularity layer`" not in card.split(SECTION_TITLE, 1)[1]
    w, h = _png(tmp_path / PLOT_FILE)
    assert h > 250  # the heatmap


def test_card_without_geometry_is_unchanged_but_for_the_bars(tmp_path):
    result = _result("model", {"model": [0.2, 0.3, 0.5]})
    card = build_card(result, plot=PLOT_FILE)
    assert SECTION_TITLE not in card.text
    with pytest.raises(ValueError, match="2 names for 3 models"):
        relabel(geometry(), ["a", "b"])


def test_coefficients_file_keeps_the_gram_matrices_and_every_entry_exactly():
    import json

    geo = geometry()
    result = _result("layer", geo.lambdas("layer"))
    result.geometry = geo
    data = json.loads(json.dumps(result.to_json()))
    grams = geo.groups("layer")
    for g, entry in data["groups"].items():
        assert entry["gram"] == [list(r) for r in grams[g].values]
        assert entry["cosine"][0][1] == grams[g].cosine(0, 1)
    stored = Geometry.from_json(data["geometry"])
    assert stored.entries == geo.entries  # exactly
    assert stored.models == ("org/chat", "org/math", "code-ft")  # named as in the card: no local path
    assert data["geometry"]["model"]["sq_norms"] == list(geo.whole.sq_norms)
    assert [o["group"] for o in data["geometry"]["overlaps"]] == ["model", "lm_head.weight"]
    result.geometry = None
    assert "geometry" not in result.to_json() and "gram" not in result.to_json()["groups"]["layers.0"]


def test_merge_warnings_name_the_overlap_for_metagpt_only():
    from hf_metagpt.api import _coefficient_warnings
    from hf_metagpt.methods import get_method

    geo = geometry()
    result = _result("model", {"model": list(geo.whole.shares)})
    result.geometry = geo
    _coefficient_warnings(result, get_method("metagpt"))
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("org/chat and org/math overlap over the whole model")
    assert "--granularity layer" in result.warnings[0]
    other = _result("model", {"model": [1 / 3] * 3})
    other.geometry = geo
    _coefficient_warnings(other, get_method("linear"))
    assert other.warnings == []
