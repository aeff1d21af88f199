"""Pieces: groups cut to a byte budget so memory does not grow with the model, with the same merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hf_metagpt
from hf_metagpt.errors import InputError
from hf_metagpt.constants import UNIT_ENV
from hf_metagpt.engine.pieces import Piece, piece_bytes, split_group, unit_bytes
from hf_metagpt.demo.tiny import build_family
from helpers import add_tokens, shards
from reference import assert_within_ulp, load_state, reference_metagpt

# About 31 KB: a tiny block of four inputs (~290 KB) is cut into single tensors and row slabs.
SMALL_MB = "0.03"
SMALL = int(0.03 * (1 << 20))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    base, fts = build_family(root, n_models=3)
    return root, base, fts


def _plan(base, fts, **kw):
    return hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], output="-", **kw)


def test_unit_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(UNIT_ENV, "2")
    assert unit_bytes() == 2 << 20
    monkeypatch.setenv(UNIT_ENV, "-1")
    with pytest.raises(InputError, match=f"{UNIT_ENV}='-1' is not a positive number of MiB"):
        unit_bytes()


@pytest.mark.parametrize("slabs", [True, False])
def test_split_covers_every_tensor_in_order_within_the_budget(family, slabs):
    root, base, fts = family
    big = root / "added-tokens"
    if not big.exists():
        add_tokens(fts[1], big, 2)
    plan = _plan(base, [fts[0], big], tokenizer_source=str(big))
    infos = plan.inputs
    for group in plan.groups:
        pieces = split_group(group, infos, SMALL, slabs=slabs)
        # Cut exactly when the whole group is over the budget (every block here; not the final
        # norm), unless it is one tensor and slabs are off.
        cuttable = slabs or len(group.tensors) > 1
        assert (len(pieces) > 1) == (cuttable and piece_bytes(Piece.whole(group), infos) > SMALL)
        assert len(pieces) > 1 or not group.name.startswith("layers.")
        # Tensors in plan order; a tensor's slabs are consecutive and tile its output rows.
        names, rows = [], {}
        for p in pieces:
            if p.rows is None:
                names += [t.name for t in p.tensors]
            else:
                (tp,) = p.tensors
                if not names or names[-1] != tp.name:
                    names.append(tp.name)
                rows.setdefault(tp.name, []).append(p.rows)
                # Merged rows and copied extra rows never share a slab.
                if tp.shared_rows is not None:
                    assert p.rows[1] <= tp.shared_rows or p.rows[0] >= tp.shared_rows
            size = piece_bytes(p, infos)
            if slabs or len(p.tensors) > 1:
                assert size <= SMALL, (group.name, [t.name for t in p.tensors], size)
        assert names == [t.name for t in group.tensors]
        for name, spans in rows.items():
            tp = next(t for t in group.tensors if t.name == name)
            assert spans[0][0] == 0 and spans[-1][1] == tp.out_shape[0]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    embed = next(g for g in plan.groups if g.name == "model.embed_tokens.weight")
    cut = split_group(embed, infos, SMALL, slabs=True)
    if slabs:
        assert [p.rows for p in cut] == [(0, 81), (81, 128), (128, 130)]  # 384 bytes a row over 3 inputs
        assert [p.extra_rows for p in cut] == [False, False, True]
    # A group that fits is one piece: the whole group, as before.
    assert [len(split_group(g, infos, 1 << 30, slabs=slabs)) for g in plan.groups] == [1] * len(plan.groups)


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_merge_in_small_pieces_equals_reference(family, tmp_path, monkeypatch, granularity):
    _, base, fts = family
    models = [str(f) for f in fts]
    whole = hf_metagpt.merge(base=str(base), models=models, output=str(tmp_path / "whole"),
                             granularity=granularity, max_shard_size="60KB", progress=False)
    monkeypatch.setenv(UNIT_ENV, SMALL_MB)
    out = tmp_path / "pieces"
    result = hf_metagpt.merge(base=str(base), models=models, output=str(out), granularity=granularity,
                              max_shard_size="60KB", progress=False)
    assert result.stats.largest_read <= SMALL < whole.stats.largest_read
    assert result.stats.pieces_read > 3 * whole.stats.pieces_read
    expected, lambdas = reference_metagpt(load_state(base), [load_state(f) for f in fts], granularity)
    got = load_state(out)
    assert sorted(got) == sorted(expected)
    for name, e in expected.items():
        assert_within_ulp(got[name], e, torch.bfloat16)
    for g, lam in lambdas.items():
        # Norms summed slab by slab: the same λ up to float64 rounding.
        assert result.coefficients[g] == pytest.approx(whole.coefficients[g], rel=1e-12)
        assert result.coefficients[g] == pytest.approx(lam, rel=1e-6)
    # Whole-block reads need no second read; cut norm groups (layer, tensor) are read twice.
    if granularity == "model":
        assert result.stats.bytes_read == whole.stats.bytes_read
    else:
        assert whole.stats.bytes_read < result.stats.bytes_read <= 2 * whole.stats.bytes_read
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())


def test_vocabulary_mismatch_in_slabs_copies_the_extra_rows(family, tmp_path, monkeypatch):
    root, base, fts = family
    big = root / "added-tokens"
    if not big.exists():
        add_tokens(fts[1], big, 2)
    monkeypatch.setenv(UNIT_ENV, SMALL_MB)
    out = tmp_path / "o"
    r = hf_metagpt.merge(base=str(base), models=[str(fts[0]), str(big)], output=str(out),
                         tokenizer_source=str(big), granularity="tensor", progress=False)
    b, f0, f1 = load_state(base), load_state(fts[0]), load_state(big)
    shared = {k: v[:128] if v.shape[0] == 130 else v for k, v in f1.items()}
    expected, lambdas = reference_metagpt(b, [f0, shared], "tensor")
    got = load_state(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == 130
        assert_within_ulp(got[name][:128], expected[name], torch.bfloat16)
        assert torch.equal(got[name][128:], f1[name][128:].to(torch.bfloat16))
        assert r.coefficients[name] == pytest.approx(lambdas[name], rel=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_methods_on_whole_tensors_give_the_same_bytes_in_small_pieces(family, tmp_path, monkeypatch, method):
    _, base, fts = family
    kw = dict(base=str(base), models=[str(f) for f in fts], method=method,
              max_shard_size="60KB", progress=False, seed=3)
    whole = hf_metagpt.merge(output=str(tmp_path / "whole"), **kw)
    monkeypatch.setenv(UNIT_ENV, SMALL_MB)
    cut = hf_metagpt.merge(output=str(tmp_path / "cut"), **kw)
    # TIES and DARE need whole tensors: the pieces are single tensors, never row slabs.
    assert cut.stats.pieces_read > whole.stats.pieces_read
    assert shards(tmp_path / "cut") == shards(tmp_path / "whole")
    assert cut.coefficients == whole.coefficients


def test_shard_written_in_slabs_loads_like_any_other(family, tmp_path, monkeypatch):
    _, base, fts = family
    monkeypatch.setenv(UNIT_ENV, SMALL_MB)
    out = tmp_path / "o"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"]["model.embed_tokens.weight"]
    loaded = load_file(shard)["model.embed_tokens.weight"]
    expected, _ = reference_metagpt(load_state(base), [load_state(f) for f in fts], "model")
    assert_within_ulp(loaded, expected["model.embed_tokens.weight"], torch.bfloat16)


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_tensors_cut_into_jobs_for_both_threads_equal_reference(family, tmp_path, monkeypatch, granularity):
    from hf_metagpt.engine import merging

    _, base, fts = family
    # 1000 elements a job: every tiny matrix (2048 to 16384 elements) is merged in several jobs.
    monkeypatch.setattr(merging, "JOB", 1000)
    assert merging.MergeKernel.spans(2500) == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert merging.MergeKernel.spans(0) == [(0, 0)]
    monkeypatch.setenv(UNIT_ENV, SMALL_MB)
    out = tmp_path / "o"
    result = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out),
                              granularity=granularity, progress=False)
    expected, lambdas = reference_metagpt(load_state(base), [load_state(f) for f in fts], granularity)
    got = load_state(out)
    for name, e in expected.items():
        assert_within_ulp(got[name], e, torch.bfloat16)
    for g, lam in lambdas.items():
        assert result.coefficients[g] == pytest.approx(lam, rel=1e-6)


def test_pass_two_merges_the_last_group_first_with_the_same_bytes(family, tmp_path, monkeypatch):
    from hf_metagpt.engine import fetch, merging

    _, base, fts = family
    kw = dict(base=str(base), models=[str(f) for f in fts], max_shard_size="60KB", progress=False)
    order: list[str] = []
    real = merging.FusedKernel.merge

    def spy(self, tensors, raws, piece, coefs, *alloc):
        if not order or order[-1] != piece.group.name:
            order.append(piece.group.name)
        return real(self, tensors, raws, piece, coefs, *alloc)

    monkeypatch.setattr(merging.FusedKernel, "merge", spy)
    names = [g.name for g in _plan(base, fts).groups]
    back = hf_metagpt.merge(output=str(tmp_path / "back"), **kw)
    assert back.stats.passes == 2 and order == names[::-1]  # the page cache holds pass 1's last groups
    # A provider that must be read in plan order (low-disk fetches shards just ahead) keeps it,
    # and so does a one-pass merge.
    order.clear()
    monkeypatch.setattr(fetch.LocalFiles, "sequential", True, raising=False)
    ahead = hf_metagpt.merge(output=str(tmp_path / "ahead"), **kw)
    assert order == names
    assert shards(tmp_path / "back") == shards(tmp_path / "ahead") and len(shards(tmp_path / "back")) > 3
    assert back.coefficients == ahead.coefficients
    monkeypatch.undo()
    monkeypatch.setattr(merging.FusedKernel, "merge", spy)
    order.clear()
    hf_metagpt.merge(output=str(tmp_path / "layer"), granularity="layer", **kw)
    assert order == names
