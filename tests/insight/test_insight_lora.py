"""Gram matrices of real peft adapters from their factors, against peft's own float64 merge.

Adapters built with peft (linear LoRA, embedding LoRA whose Δ is (B·A)ᵀ, rsLoRA with a saved
lm_head) beside a full fine-tune; per tensor, the Gram matrix is taken the way the engine will
(factors for LoRA updates, formed τ for full tensors); whole-model and per-layer values must equal
float64 dot products of the fine-tunes peft materialises (merge_and_unload in float64).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_metagpt.insight.geometry import Geometry
from hf_metagpt.engine.gram import LowRank, mixed_gram
from hf_metagpt.sources.lora import ADAPTER_WEIGHTS, load_adapter_info
from hf_metagpt.sources.refs import parse_ref
from hf_metagpt.demo.tiny import TinySpec, build_family
from oracles import lowrank_dense
from reference import group_of, load_state
from test_lora import make_adapter, materialize64

SPEC = TinySpec(dtype=torch.float32, max_shard_size="200KB")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("insight_lora")
    base, (full,) = build_family(root, n_models=1, spec=SPEC)
    adapters = [
        make_adapter(base, root / "ad_plain", seed=10, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_adapter(base, root / "ad_embed", seed=20, r=4, lora_alpha=8,
                     target_modules=["embed_tokens", "q_proj", "down_proj"], save_embedding_layers=False),
        make_adapter(base, root / "ad_saved", seed=30, r=2, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ]
    return base, full, adapters


def _parts(name, base_state, full_state, infos, raws):
    b = base_state[name].float()
    parts = [full_state[name].float() - b]
    for info, raw in zip(infos, raws):
        m = info.lora.get(name)
        low = LowRank(raw[m.b_key], raw[m.a_key], m.scale, m.transposed) if m else None
        if name in info.full:  # a saved module: τ = saved − base (plus its LoRA update, if any)
            tau = raw[info.full[name]].float() - b
            parts.append(tau if low is None else tau + lowrank_dense(low, torch.float32))
        else:
            parts.append(low)
    return parts


def test_adapter_and_full_fine_tune_grams_equal_peft_materialised_float64(family):
    base, full, adapters = family
    base_state, full_state = load_state(base), load_state(full)
    infos = [load_adapter_info(parse_ref(str(a))) for a in adapters]
    raws = [load_file(a / ADAPTER_WEIGHTS) for a in adapters]
    assert any(m.transposed for m in infos[1].lora.values())  # the embedding LoRA: Δ = (B·A)ᵀ
    assert infos[2].full == {"lm_head.weight": "base_model.model.lm_head.weight"}
    names = [n for n, t in base_state.items() if t.is_floating_point()]
    kinds = {}
    entries = []
    for n in names:
        parts = _parts(n, base_state, full_state, infos, raws)
        kinds[n] = [type(p).__name__ for p in parts]
        entries.append((n, mixed_gram(parts)))
    geo = Geometry.from_tensors(["full", "plain", "embed", "saved"], entries)
    # Every combination the engine meets: factors against factors (both orientations), factors
    # against a formed τ, and untouched tensors.
    assert kinds["model.embed_tokens.weight"] == ["Tensor", "NoneType", "LowRank", "NoneType"]
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == ["Tensor", "LowRank", "LowRank", "LowRank"]
    assert kinds["lm_head.weight"] == ["Tensor", "NoneType", "NoneType", "Tensor"]

    states = [full_state] + [materialize64(base, a) for a in adapters]
    for granularity in ("model", "layer"):
        want: dict[str, torch.Tensor] = {}
        for n in names:
            taus = torch.stack([(s[n].double() - base_state[n].double()).reshape(-1) for s in states])
            g = group_of(n, granularity)
            want[g] = want.get(g, 0) + taus @ taus.t()
        got = geo.groups(granularity)
        assert list(got) == list(want)
        for g, w in want.items():
            m = torch.tensor(got[g].values, dtype=torch.float64)
            # Full fine-tune pairs see τ rounded to float32 once; adapter pairs are exact.
            torch.testing.assert_close(m, w, rtol=1e-6, atol=1e-9 * float(w.diagonal().max()))
            torch.testing.assert_close(m[1:3, 1:3], w[1:3, 1:3], rtol=1e-10, atol=1e-13 * float(w.diagonal().max()))
    whole = geo.whole
    assert all(x > 0 for x in whole.sq_norms)
    # q_proj is updated by every adapter: their cross terms are really measured, not zero.
    q = geo.groups("tensor")["model.layers.0.self_attn.q_proj.weight"]
    assert q.values[1][2] != 0.0 and q.values[2][3] != 0.0


def _reference_groups(base, states, granularity):
    base_state = load_state(base)
    want: dict[str, torch.Tensor] = {}
    for n, t in base_state.items():
        if not t.is_floating_point():
            continue
        taus = torch.stack([(s[n].double() - t.double()).reshape(-1) for s in states])
        g = group_of(n, granularity)
        want[g] = want.get(g, 0) + taus @ taus.t()
    return want


@pytest.mark.parametrize("which", ["mixed", "adapters"])
def test_inspect_of_adapters_and_full_fine_tunes_equals_peft_materialised(family, which, monkeypatch):
    """`mixed`: a full fine-tune beside adapters (the method path, τ formed for full tensors);
    `adapters`: LoRA only (the low-rank path, the base in row slabs; factors counted once)."""
    import hf_metagpt
    from hf_metagpt.constants import UNIT_ENV

    base, full, adapters = family
    inputs = [full, *adapters] if which == "mixed" else adapters[:2]
    monkeypatch.setenv(UNIT_ENV, "0.01")  # 10 KiB pieces: the embedding in slabs
    result = hf_metagpt.inspect(base=str(base), models=[str(p) for p in inputs], progress=False, device="cpu")
    states = [load_state(p) if p == full else materialize64(base, p) for p in inputs]
    for granularity in ("model", "layer"):
        want = _reference_groups(base, states, granularity)
        got = result.geometry.groups(granularity)
        assert set(got) == set(want)
        for g, w in want.items():
            torch.testing.assert_close(torch.tensor(got[g].values, dtype=torch.float64), w, rtol=1e-6,
                                       atol=1e-9 * float(w.diagonal().max()))
    names = [n for n, _ in result.geometry.entries]
    assert len(names) == len(set(names))  # whole-tensor factors: each tensor once, even in slabs
