"""Transformer blocks of other families (GPT-2/Falcon `h.N`, GPT-NeoX, OPT's decoder, multimodal towers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.engine.plan import norm_group_of
from hf_metagpt.sources.architecture import block_of
from reference import assert_within_ulp, load_state


@pytest.mark.parametrize("name, block", [
    ("model.layers.7.mlp.up_proj.weight", "layers.7"),  # LLaMA & co: the group names of METHOD.md
    ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"),  # GPT-2
    ("transformer.h.12.self_attention.query_key_value.weight", "transformer.h.12"),  # Falcon
    ("gpt_neox.layers.0.attention.dense.weight", "gpt_neox.layers.0"),
    ("model.decoder.layers.5.fc1.weight", "decoder.layers.5"),  # OPT
    ("model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight", "vision_tower.vision_model.encoder.layers.3"),
    ("model.language_model.layers.3.mlp.up_proj.weight", "language_model.layers.3"),
    ("model.layers.2.block_sparse_moe.experts.7.w1.weight", "layers.2"),  # the leftmost block wins
    ("lm_head.weight", None),
    ("model.embed_tokens.weight", None),
    ("transformer.wte.weight", None),
])
def test_block_of_names_blocks_per_family_and_keeps_towers_apart(name, block):
    assert block_of(name) == block
    assert norm_group_of(name, "layer") == (block or name)


def _family(root: Path, kind: str) -> list[Path]:
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig,
                              OPTForCausalLM)

    cls, cfg = {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)),
        "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                       intermediate_size=64, vocab_size=64, max_position_embeddings=64,
                                                       bos_token_id=0, eos_token_id=0)),
        "opt": (OPTForCausalLM, OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=64,
                                          vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    }[kind]
    torch.manual_seed(0)
    base = cls(cfg)
    folders = [root / "base"]
    base.save_pretrained(folders[0])
    state = base.state_dict()
    for t in (1, 2):
        ft = cls(cfg)
        # task vectors whose size depends on the block and the task, so every block gets its own λ
        ft.load_state_dict({k: v + 0.01 * (1 + (t * 3 + k.count("1") + len(k)) % 4) * torch.randn_like(v)
                            if v.is_floating_point() else v for k, v in state.items()})
        folders.append(root / f"ft{t}")
        ft.save_pretrained(folders[-1])
    return folders


# What each family's block of a stored tensor is, spelled out per family (not the engine's rule).
BLOCKS = {
    "gpt2": lambda n: ".".join(n.split(".")[:3]) if n.startswith("transformer.h.") else n,
    "gpt_neox": lambda n: ".".join(n.split(".")[:3]) if n.startswith("gpt_neox.layers.") else n,
    "opt": lambda n: ".".join(n.split(".")[1:4]) if n.startswith("model.decoder.layers.") else n,
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_layer_granularity_groups_per_block_for_other_families(kind, tmp_path):
    folders = _family(tmp_path, kind)
    out = tmp_path / "out"
    result = hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(out),
                              granularity="layer", device="cpu", progress=False)
    assert not [w for w in result.warnings if "falls back" in w]
    base, fts = load_state(folders[0]), [load_state(f) for f in folders[1:]]
    group = BLOCKS[kind]
    blocks = {group(n) for n in base if group(n) != n}
    assert len(blocks) == 3 and blocks <= set(result.coefficients)
    # An independent MetaGPT with those groups (float64), against the output within one ulp.
    sq: dict[str, list[float]] = {}
    for n, b in base.items():
        if b.is_floating_point():
            acc = sq.setdefault(group(n), [0.0, 0.0])
            for i, ft in enumerate(fts):
                acc[i] += float(((ft[n].double() - b.double()) ** 2).sum())
    lam = {g: [v / sum(vals) for v in vals] for g, vals in sq.items()}
    assert set(result.coefficients) == set(lam)
    for g, want in lam.items():
        assert result.coefficients[g] == pytest.approx(want, rel=1e-12)
    assert len({tuple(lam[b]) for b in blocks}) == 3, "the blocks should differ (else the test proves little)"
    merged = load_state(out)
    for n, b in base.items():
        expected = b.double() + sum(lam[group(n)][i] * (ft[n].double() - b.double()) for i, ft in enumerate(fts))
        assert_within_ulp(merged[n], expected, b.dtype, scale=b)


# Per-layer parameters (mergekit gradients) read a tensor's layer from the same rule as the plan's
# blocks. Before they shared it, `layers.N` alone was read: on GPT-2/Falcon/BLOOM names (`h.N`)
# every tensor took the gradient's first value.
@pytest.mark.parametrize("n_layers", [2, 12])
def test_gradient_values_per_layer_are_the_same_for_h_n_and_layers_n_names(n_layers):
    from hf_metagpt.methods import settings
    from hf_metagpt.methods.base import TensorContext

    g = settings.parse_setting("m", "t", [0, 1], lambda m, v: v)
    gpt2 = [settings.resolve(g, TensorContext.of(f"transformer.h.{k}.attn.c_attn.weight", 0, n_layers))
            for k in range(n_layers)]
    llama = [settings.resolve(g, TensorContext.of(f"model.layers.{k}.self_attn.q_proj.weight", 0, n_layers))
             for k in range(n_layers)]
    falcon = [settings.resolve(g, TensorContext.of(f"transformer.h.{k}.self_attention.dense.weight", 0, n_layers))
              for k in range(n_layers)]
    assert gpt2 == llama == falcon == [k / (n_layers - 1) for k in range(n_layers)]
    assert TensorContext.of("transformer.h.11.mlp.c_fc.weight", 0, 12).layer == 11
    assert TensorContext.of("transformer.wte.weight", 0, 12).layer is None


def test_task_arithmetic_weight_gradient_on_gpt2_blocks(tmp_path):
    """weights [[0, 1], 1] on GPT-2: block k of 3 takes w1 = k/2 (not 0 everywhere), against an
    independent float64 sum per stored name."""
    folders = _family(tmp_path, "gpt2")
    out = tmp_path / "out"
    hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(out),
                     method="task_arithmetic", parameters={"weights": [[0.0, 1.0], 1.0]}, device="cpu",
                     progress=False)
    base, fts = load_state(folders[0]), [load_state(f) for f in folders[1:]]
    merged = load_state(out)
    seen = set()
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        k = int(n.split(".")[2]) if n.startswith("transformer.h.") else None
        w1 = 0.0 if k is None else k / 2  # outside the blocks: the gradient's first value
        seen.add(w1)
        expected = b.double() + w1 * (fts[0][n].double() - b.double()) + (fts[1][n].double() - b.double())
        assert_within_ulp(merged[n], expected, b.dtype, scale=b)
    assert seen == {0.0, 0.5, 1.0}
