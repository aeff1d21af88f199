"""A MetaGPT merge keeps the Gram matrices beside its norms: result, coefficients file, warnings, card."""

from __future__ import annotations

import json

import pytest
import torch

import hf_metagpt
from hf_metagpt.insight.geometry import Geometry
from test_insight_inspect import overlapping_family, reference


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return overlapping_family(tmp_path_factory.mktemp("insight_merge"))


def test_merge_records_geometry_warns_and_explains_it_in_the_card(family, tmp_path):
    base, fts = family
    out = tmp_path / "merged"
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu",
                              progress=False)
    geo = result.geometry
    assert geo is not None and geo.models == tuple(str(f) for f in fts)
    want = torch.tensor(reference(base, fts, "model")["model"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(geo.whole.values, dtype=torch.float64), want, rtol=1e-12, atol=1e-12)
    # The λ come from the same numbers: the diagonal is the merge's norms, bit for bit.
    assert list(geo.whole.sq_norms) == result.sq_norms["model"]
    assert list(geo.whole.shares) == result.coefficients["model"]
    # Same pass, same pieces as inspect: identical entries.
    seen = hf_metagpt.inspect(base=str(base), models=[str(f) for f in fts], progress=False, device="cpu")
    assert seen.geometry.entries == geo.entries
    overlap = [w for w in result.warnings if "overlap" in w]
    assert len(overlap) == 1 and "lm_head.weight" in overlap[0] and "--granularity layer" in overlap[0]
    data = json.loads((out / "metagpt_coefficients.json").read_text())
    assert data["groups"]["model"]["gram"] == [list(r) for r in geo.whole.values]
    assert Geometry.from_json(data["geometry"]).entries == geo.entries
    card = (out / "README.md").read_text()
    assert "## Task-vector geometry" in card and "`lm_head.weight` (cos +" in card
    for png in ("metagpt_lambdas.png", "metagpt_layer_shares.png", "metagpt_cosines.png"):
        assert (out / png).stat().st_size > 1000, png
    assert str(base.parent) not in card  # local inputs by their folder's name only

    # A rerun reuses the finished output's norms (pass 1 skipped) and its Gram matrices.
    again = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu",
                             progress=False, overwrite=True)
    assert again.stats.passes == 1 and again.geometry == geo


@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_one_pass_merges_record_every_tensor(family, tmp_path, granularity):
    base, fts = family
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts[1:]], output=str(tmp_path / "m"),
                              granularity=granularity, device="cpu", progress=False)
    assert result.geometry is not None
    groups = result.geometry.groups(granularity)
    assert {g: list(gram.sq_norms) for g, gram in groups.items()} == result.sq_norms
    want = reference(base, fts[1:], "layer")
    for g, d in want.items():
        torch.testing.assert_close(torch.tensor(result.geometry.layers[g].values, dtype=torch.float64),
                                   torch.tensor(d, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_methods_without_norms_record_no_geometry(family, tmp_path):
    base, fts = family
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "ta"),
                              method="task_arithmetic", device="cpu", progress=False)
    assert result.geometry is None
    assert "Task-vector geometry" not in (tmp_path / "ta" / "README.md").read_text()
    assert "geometry" not in json.loads((tmp_path / "ta" / "metagpt_coefficients.json").read_text())


@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_a_resumed_merge_has_the_same_geometry(family, tmp_path, monkeypatch, granularity):
    """The ledger saves the Gram matrices with the norms before each shard: a resumed run keeps them."""
    from test_engine import _crash_after_renames

    base, fts = family
    args = dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False,
                max_shard_size="150KB", granularity=granularity)
    clean = hf_metagpt.merge(output=str(tmp_path / "clean"), **args)
    _crash_after_renames(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    monkeypatch.undo()
    result = hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    assert result.stats.shards_reused == 2
    assert result.geometry is not None and result.geometry == clean.geometry


def test_metagpt_dare_card_says_the_geometry_is_of_the_dropped_task_vectors(family, tmp_path):
    base, fts = family
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "d"),
                              method="metagpt_dare", seed=1, device="cpu", progress=False)
    assert result.geometry is not None
    # The λ are the shares of the transformed task vectors' norms: the geometry is of those.
    assert list(result.geometry.whole.shares) == result.coefficients["model"]
    assert "(the task vectors after DARE, the ones the λ are computed from)" in (tmp_path / "d" / "README.md").read_text()
