"""Geometry values, the overlap rule, `inspect --json` and its table, against independent float64 sums."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from hf_metagpt.insight.geometry import COSINE_LIMIT, Geometry, Gram, group_grams, overlap_warnings
from hf_metagpt.engine.gram import task_gram
from hf_metagpt.insight.report import InspectResult, inspect_json, text_table
from oracles import task_sq_norms
from reference import group_of

NAMES = ["org/chat", "org/math", "org/code"]
LAYERS = 4


def state_dicts(overlap_in: dict[str, tuple[int, int, float]] | None = None, seed: int = 0, dtype=torch.bfloat16):
    """A tiny LLaMA-shaped base and three fine-tunes; `overlap_in` gives tensors where two models share
    a direction: {tensor: (i, j, sign)} adds ±the same large vector to τi and τj there."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (32, 16)}
    for n in range(LAYERS):
        for p, s in (("self_attn.q_proj.weight", (16, 16)), ("mlp.up_proj.weight", (24, 16)),
                     ("input_layernorm.weight", (16,))):
            shapes[f"model.layers.{n}.{p}"] = s
    shapes |= {"model.norm.weight": (16,), "lm_head.weight": (32, 16)}
    base = {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    base["model.layers.0.counter"] = torch.arange(4)  # an integer buffer: not a task vector
    fts = []
    for t in range(3):
        fts.append({k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (t + 1)).to(dtype)
                    if v.is_floating_point() else v.clone() for k, v in base.items()})
    for name, (i, j, sign) in (overlap_in or {}).items():
        shared = torch.randn(base[name].shape, generator=g) * 2e-2
        fts[i][name] = (fts[i][name].float() + shared).to(dtype)
        fts[j][name] = (fts[j][name].float() + sign * shared).to(dtype)
    return base, fts


def geometry_of(base, fts) -> Geometry:
    """What the engine will hand over: one Gram per floating tensor, in plan order (here: insertion)."""
    entries = [(k, task_gram(b, [f[k] for f in fts])) for k, b in base.items() if b.is_floating_point()]
    return Geometry.from_tensors(NAMES, entries)


def reference(base, fts, granularity):
    """Independent: whole state dicts, float64, per group — Σ τi·τj, cosines, λ."""
    dots: dict[str, list[list[float]]] = {}
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        taus = [(f[k].double() - b.double()).reshape(-1) for f in fts]
        acc = dots.setdefault(group_of(k, granularity), [[0.0] * 3 for _ in range(3)])
        for i in range(3):
            for j in range(3):
                acc[i][j] += float(taus[i] @ taus[j])
    cos = {g: [[d[i][j] / math.sqrt(d[i][i] * d[j][j]) for j in range(3)] for i in range(3)] for g, d in dots.items()}
    lam = {g: [d[i][i] / sum(d[k][k] for k in range(3)) for i in range(3)] for g, d in dots.items()}
    return dots, cos, lam


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_groups_norms_cosines_and_lambdas_equal_an_independent_float64_computation(granularity):
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0)})
    geo = geometry_of(base, fts)
    dots, cos, lam = reference(base, fts, granularity)
    groups = geo.groups(granularity)
    assert list(groups) == list(dots)
    for g, gram in groups.items():
        want = torch.tensor(dots[g], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(gram.values, dtype=torch.float64), want, rtol=1e-12,
                                   atol=1e-14 * float(want.diagonal().max()))
        for i in range(3):
            assert gram.cosines[i] == pytest.approx(cos[g][i], rel=1e-9, abs=1e-12)
        assert geo.lambdas(granularity)[g] == pytest.approx(lam[g], rel=1e-12)
    if granularity == "layer":
        assert list(groups)[:3] == ["model.embed_tokens.weight", "layers.0", "layers.1"]
        assert list(groups)[-2:] == ["model.norm.weight", "lm_head.weight"]


def test_group_diagonals_are_the_engine_group_norms_bit_for_bit():
    """Groups are summed in entry order, as the engine adds tensor norms: λ cannot move."""
    base, fts = state_dicts()
    geo = geometry_of(base, fts)
    sums: dict[str, list[float]] = {}
    for k, b in base.items():
        if b.is_floating_point():
            acc = sums.setdefault(group_of(k, "layer"), [0.0, 0.0, 0.0])
            for i, v in enumerate(task_sq_norms(b, [f[k] for f in fts]).tolist()):
                acc[i] += v
    assert {g: list(gram.sq_norms) for g, gram in geo.layers.items()} == sums


def test_zero_norms_give_zero_cosines_and_lambdas_never_nan():
    base, fts = state_dicts()
    fts[2] = {k: v.clone() for k, v in base.items()}  # equal to the base everywhere
    geo = geometry_of(base, fts)
    whole = geo.whole
    assert whole.sq_norms[2] == 0.0
    assert whole.cosines[2] == (0.0, 0.0, 0.0) and whole.cosines[0][2] == 0.0
    assert whole.cosines[0][0] == 1.0
    assert whole.shares[2] == 0.0
    assert geo.fractions()["layers.0"][2] == 0.0
    zero = Gram.zeros(2)
    assert zero.shares == (0.0, 0.0) and zero.cosines == ((0.0, 0.0), (0.0, 0.0))
    assert zero.cross_term_share([0.5, 0.5]) == 0.0
    text = json.dumps(inspect_json(geo))
    assert "NaN" not in text and "Infinity" not in text


def test_fractions_say_where_each_model_changed_the_base():
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0)})
    geo = geometry_of(base, fts)
    fr = geo.fractions("layer")
    for k in range(3):
        assert sum(v[k] for v in fr.values()) == pytest.approx(1.0, rel=1e-12)
    dots, _, _ = reference(base, fts, "layer")
    whole, _, _ = reference(base, fts, "model")
    assert fr["lm_head.weight"][0] == pytest.approx(dots["lm_head.weight"][0][0] / whole["model"][0][0], rel=1e-12)
    assert fr["lm_head.weight"][0] > 0.5 > fr["lm_head.weight"][2]  # the shared vector is large


def test_cross_term_share_and_combined_norm_equal_the_merged_update():
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0), "model.layers.2.mlp.up_proj.weight": (1, 2, -1.0)})
    geo = geometry_of(base, fts)
    lam = list(geo.whole.shares)
    merged = sum(float(((sum(l * (f[k].double() - b.double()) for l, f in zip(lam, fts))) ** 2).sum())
                 for k, b in base.items() if b.is_floating_point())
    assert geo.whole.combined_sq_norm(lam) == pytest.approx(merged, rel=1e-10)
    diag = sum(l * l * n for l, n in zip(lam, geo.whole.sq_norms))
    assert geo.whole.cross_term_share(lam) == pytest.approx((merged - diag) / merged, rel=1e-8)


def test_overlap_rule_names_models_and_layers_and_teaches():
    # chat and math share a direction in lm_head (large); math and code oppose in block 2's MLP.
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0), "model.layers.2.mlp.up_proj.weight": (1, 2, -1.0)})
    geo = geometry_of(base, fts)
    flagged = geo.overlaps()
    by = {(o.i, o.j, o.group): o for o in flagged}
    assert (0, 1, "lm_head.weight") in by and by[(0, 1, "lm_head.weight")].cosine > 0.9
    assert (1, 2, "layers.2") in by and by[(1, 2, "layers.2")].cosine < -0.5
    assert all(abs(o.cosine) > COSINE_LIMIT and o.share >= 0.10 for o in flagged)
    # Nothing else: independent task vectors are near orthogonal everywhere else.
    assert {(o.i, o.j) for o in flagged} == {(0, 1), (1, 2)}
    assert not any(o.group == "model.norm.weight" for o in flagged)
    warnings = overlap_warnings(geo)
    assert len(warnings) == 2
    w01 = next(w for w in warnings if w.startswith("org/chat and org/math"))
    assert "in lm_head.weight (cos +0." in w01 and "of their ‖τ‖²" in w01
    assert "orthogonal" in w01 and "--granularity layer" in w01 and "hf-metagpt compare" in w01
    assert "same direction" in w01 and "cancel" not in w01
    w12 = next(w for w in warnings if w.startswith("org/math and org/code"))
    assert "layers.2 (cos -0." in w12 and "cancel" in w12
    # At layer granularity the advice is the comparison only.
    assert all("--granularity layer" not in w for w in overlap_warnings(geo, granularity="layer"))


def test_overlap_rule_ignores_small_groups_and_counts_the_whole_model():
    # Overlap only in the final norm: a large cosine, but a negligible share of ‖τ‖².
    base, fts = state_dicts()
    fts[1]["model.norm.weight"] = fts[0]["model.norm.weight"].clone()
    geo = geometry_of(base, fts)
    assert geo.layers["model.norm.weight"].cosine(0, 1) > 0.4
    assert geo.overlaps() == [] and overlap_warnings(geo) == []
    # The same norm counts once its share is lowered below the rule's; and a whole-model overlap
    # is always reported (constructed Gram matrices: two equal task vectors beside a third).
    assert geo.overlaps(share=0.0)
    g = Gram(((1.0, 0.9, 0.0), (0.9, 1.0, 0.0), (0.0, 0.0, 4.0)))
    whole_only = Geometry(tuple(NAMES), (("model.layers.0.x", g),))
    found = whole_only.overlaps()
    assert [(o.i, o.j, o.group) for o in found] == [(0, 1, "model"), (0, 1, "layers.0")]
    assert "over the whole model (cos +0.90)" in overlap_warnings(whole_only)[0]


def test_inspect_json_has_the_issue_schema_and_values():
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0)})
    geo = geometry_of(base, fts)
    res = InspectResult.build("org/base", geo)
    out = json.loads(json.dumps(res.to_json()))
    assert out["models"] == NAMES and out["base"] == "org/base"
    dots, cos, _ = reference(base, fts, "model")
    assert out["model"]["sq_norms"] == pytest.approx([dots["model"][i][i] for i in range(3)], rel=1e-12)
    assert out["model"]["cosine"][0] == pytest.approx(cos["model"][0], rel=1e-9)
    ldots, lcos, llam = reference(base, fts, "layer")
    assert list(out["groups"]) == list(ldots)
    for g in ldots:
        assert out["groups"][g]["sq_norms"] == pytest.approx([ldots[g][i][i] for i in range(3)], rel=1e-12)
        assert out["groups"][g]["cosine"][1] == pytest.approx(lcos[g][1], rel=1e-9, abs=1e-12)
        assert out["lambdas"]["layer"][g] == pytest.approx(llam[g], rel=1e-12)
    assert set(out["lambdas"]) == {"model", "layer", "tensor"}
    assert len(out["lambdas"]["tensor"]) == sum(1 for b in base.values() if b.is_floating_point())
    assert [(o["models"], o["group"]) for o in out["overlaps"]] == [
        (["org/chat", "org/math"], "model"), (["org/chat", "org/math"], "lm_head.weight")]
    assert out["overlaps"][1]["share"] == pytest.approx(
        (ldots["lm_head.weight"][0][0] + ldots["lm_head.weight"][1][1]) / (dots["model"][0][0] + dots["model"][1][1]))
    assert out["warnings"] == list(res.warnings) and len(res.warnings) == 1
    assert out["rule"]["cosine"] == COSINE_LIMIT


def test_text_table_rows_and_values():
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0)})
    geo = geometry_of(base, fts)
    text = text_table(geo)
    lines = text.splitlines()
    assert lines[0] == "models: [1] org/chat  [2] org/math  [3] org/code"
    header = re.split(r"\s{2,}", lines[2].strip())
    assert header == ["group", "‖τ1‖²", "‖τ2‖²", "‖τ3‖²", "λ1", "λ2", "λ3", "cos 1·2", "cos 1·3", "cos 2·3"]
    row = next(line for line in lines if line.startswith("lm_head.weight"))
    cells = row.split()
    gram = geo.layers["lm_head.weight"]
    assert float(cells[1]) == pytest.approx(gram.sq_norms[0], rel=1e-3)
    assert float(cells[4]) == pytest.approx(gram.shares[0], abs=1e-4)
    assert float(cells[7]) == pytest.approx(gram.cosine(0, 1), abs=1e-3)
    whole = next(line for line in lines if line.startswith("whole model"))
    assert float(whole.split()[2 + 3 + 3 + 1]) == pytest.approx(geo.whole.cosine(0, 2), abs=1e-3)
    assert re.search(r"^  model  \(1 group\(s\)\): \[1\] 0\.\d{4}", text, re.M)
    short = text_table(geo, max_rows=5).splitlines()
    assert sum(1 for line in short if line.startswith("…")) == 1
    assert any(line.startswith("lm_head.weight") for line in short)  # the last groups are kept


def test_group_grams_rejects_unknown_granularity_and_mismatched_sizes():
    with pytest.raises(ValueError, match="unknown granularity"):
        group_grams([], "block")
    with pytest.raises(ValueError, match="wrong size"):
        Geometry(("a", "b"), (("x", Gram.zeros(3)),))
    with pytest.raises(ValueError, match="square"):
        Gram(((1.0, 2.0),))


def test_geometry_round_trips_through_json_exactly():
    base, fts = state_dicts({"lm_head.weight": (0, 1, 1.0)})
    geo = geometry_of(base, fts)
    back = Geometry.from_json(json.loads(json.dumps(geo.to_json())))
    assert back == geo
    with pytest.raises(ValueError, match="not a stored geometry"):
        Geometry.from_json({"models": ["a"]})


def test_text_table_of_many_models_stays_narrow_and_names_the_most_aligned_pairs():
    """At 100 models a column per pair would be 4,950 columns: the table keeps a fixed width instead."""
    import numpy as np

    from hf_metagpt.insight.report import TOP_PAIRS

    t, rng = 100, np.random.default_rng(0)
    names = [f"org/ft-{k:03d}" for k in range(t)]
    entries, whole = [], np.zeros((t, t))
    for layer in range(3):
        x = rng.standard_normal((t, 64))
        x[7] = x[3] + 0.05 * rng.standard_normal(64)  # models [4] and [8] nearly parallel
        x[50] = -x[20] + 0.3 * rng.standard_normal(64)  # [21] and [51] opposed
        x[99] *= 10.0  # [100] carries the largest update
        gram = x @ x.T
        whole += gram
        entries.append((f"model.layers.{layer}.mlp.down_proj.weight", Gram.of(gram)))
    geo = Geometry(tuple(names), tuple(entries))
    text = text_table(geo)
    lines = text.splitlines()
    assert max(len(line) for line in lines) < 120, max(lines, key=len)
    assert len(lines) < t + 40  # a row per model and per group, not per pair
    # the listed pairs are the largest |cos| of the whole model, computed here independently
    norms = np.sqrt(np.diag(whole))
    cos = whole / np.outer(norms, norms)
    iu = np.triu_indices(t, 1)
    order = np.argsort(-np.abs(cos[iu]), kind="stable")[:TOP_PAIRS]
    expected = [(iu[0][o] + 1, iu[1][o] + 1, cos[iu][o]) for o in order]
    start = next(k for k, line in enumerate(lines) if line.startswith(f"the {TOP_PAIRS} pairs of largest |cos|"))
    listed = lines[start + 1:start + 1 + TOP_PAIRS]
    for line, (i, j, c) in zip(listed, expected):
        assert line.split()[:2] == [f"[{i}]·[{j}]", f"{c:+.3f}"], (line, i, j, c)
    assert listed[0].split()[:1] == ["[4]·[8]"] and f"{names[3]} · {names[7]}" in listed[0]
    assert any(line.split()[0] == "[21]·[51]" and line.split()[1].startswith("-0.9") for line in listed)
    # a row per model: [100]'s λ is its share of the whole model's squared norm
    row = next(line for line in lines if line.startswith("[100]"))
    assert row.split()[1] == names[99]
    assert float(row.split()[3]) == pytest.approx(whole[99, 99] / np.trace(whole), abs=1e-4)
    assert row.split()[-1] != "[100]"
    row4 = next(line for line in lines if line.startswith("[4] "))
    assert row4.split()[-2:] == [f"{cos[3, 7]:+.3f}", "[8]"]
    # groups: one summary row each, with the pair of largest |cos| in it
    group = next(line for line in lines if line.startswith("layers.0") or line.startswith("model.layers.0"))
    assert "[4]·[8]" in group
    lam = geo.lambdas("model")["model"]
    assert f"{max(lam):.4f} ([100])" in text
