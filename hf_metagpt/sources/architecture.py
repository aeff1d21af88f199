"""Architecture facts, from names and configs alone: which block and layer a tensor is in, what
transformers says of a config, and the parameter names and shapes a config implies.

One home for each: the plan groups tensors with `block_of`, methods read per-layer parameters
with `layer_of`, layer maps rename with `split_block`; the plan, `verify` and pickle inputs
check stored tensors against `skeleton_names` (`skeleton_mismatches`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from . import archcache

log = logging.getLogger(__name__)

# Config fields that must agree for task vectors to make sense (vocab_size is handled by the
# vocabulary policy of docs/method.md instead).
CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "tie_word_embeddings",
)
# A transformer block: `layers.N.` (LLaMA, Mistral, Qwen, Gemma, GPT-NeoX, OPT's decoder, towers of
# multimodal models) or `h.N.` (GPT-2, Falcon, BLOOM). The leftmost match names the block.
BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def split_block(name: str) -> tuple[str, int, str] | None:
    """(`<path>.layers.`, N, the rest from the dot after N) of a tensor in a block, else None.

    `model.layers.3.mlp.up_proj.weight` -> (`model.layers.`, 3, `.mlp.up_proj.weight`).
    """
    m = BLOCK.search(name)
    if not m:
        return None
    return name[: m.start(1)], int(m.group(1)), name[m.end(1):]


def stream_order(name: str) -> tuple[int, str, int, str]:
    """Sort key of the order a merge reads and writes tensors: embeddings, the blocks by number, the rest."""
    block = BLOCK.search(name)
    if block:
        return (1, name[: block.start()], int(block.group(1)), name)
    return (0 if "embed" in name else 2, "", 0, name)


def layer_of(name: str) -> int | None:
    """The layer N of a tensor in block `layers.N` / `h.N` (None outside the blocks)."""
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def block_of(name: str) -> str | None:
    """The block a tensor belongs to: `layers.N` for `model.layers.N.*`, else its path up to N.

    The path keeps blocks of different towers apart (`vision_tower.encoder.layers.3` and
    `language_model.layers.3` are two groups) and names other families' blocks as they are
    (`transformer.h.3`, `gpt_neox.layers.3`, `decoder.layers.3`); the leading `model.` is dropped,
    so LLaMA-style names keep the group names of METHOD.md.
    """
    m = BLOCK.search(name)
    if not m:
        return None
    path = name[: m.end() - 1]
    return path[len("model."):] if path.startswith("model.") else path


def config_object(config: dict[str, Any]):
    """The config as transformers' config class reads it (its defaults filled in), or None when
    transformers does not know the architecture (custom code: the checks then use the raw file)."""
    try:
        from transformers import AutoConfig

        cfg = dict(config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except Exception as exc:  # unknown or custom model_type
        log.debug("transformers cannot read a %s config: %s", config.get("model_type"), exc)
        return None


def config_facts(config: dict[str, Any]) -> dict[str, Any] | None:
    """transformers' values of `CONFIG_KEYS` for this config (its class's defaults where the file
    omits a field), or None when it does not know the architecture. Cached (`archcache`)."""
    def ask() -> dict[str, Any] | None:
        obj = config_object(config)
        return None if obj is None else {key: getattr(obj, key, None) for key in CONFIG_KEYS}

    return archcache.cached("config", config, ask)


def config_value(config: dict[str, Any], facts: dict[str, Any] | None, key: str) -> Any:
    """A config field as transformers reads it: the class's default where the file omits it
    (GPT-2 configs omit `tie_word_embeddings`, which transformers reads as True)."""
    if key in config or facts is None:
        return config.get(key)
    return facts.get(key)


def tied_embeddings(config: dict[str, Any]) -> bool:
    return bool(config_value(config, config_facts(config), "tie_word_embeddings"))


def skeleton_names(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes the base config implies, from an empty-weight (meta) model.

    Cached per config and transformers release (`archcache`): building the model is most of a
    merge's start-up.
    """
    names = archcache.cached("skeleton", config, lambda: _skeleton_names(config))
    return None if names is None else {k: tuple(v) for k, v in names.items()}


def _skeleton_names(config: dict[str, Any]) -> dict[str, list[int]] | None:
    """Built under torch's own `meta` device context (no weights, and unlike accelerate's
    `init_empty_weights` nothing in `torch.nn` is patched for other threads meanwhile)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        cfg = config_object(config)
        if cfg is None:
            raise ValueError("unknown architecture")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        state = model.state_dict()
        try:  # transformers 5 renames some weights in memory (GPT-NeoX embed_out -> lm_head): use the stored names
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(model, state)
        except Exception as exc:  # older transformers, or a conversion that needs real tensors
            log.debug("stored names of %s not derived (%s); using the module names", config.get("model_type"), exc)
        return {k: list(v.shape) for k, v in state.items()}
    except Exception as exc:  # custom architectures: the check is skipped, not the merge
        log.warning("Could not build a %s skeleton to check parameter names (%s); skipping that check.",
                    config.get("model_type"), exc)
        return None


def num_layers(config: dict[str, Any]) -> int | None:
    """The model's layer count as transformers reads the config (GPT-2 and BLOOM store `n_layer`,
    which transformers reads as `num_hidden_layers`); None when unknown."""
    facts = None if "num_hidden_layers" in config else config_facts(config)
    n = config_value(config, facts, "num_hidden_layers")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def skeleton_mismatches(expected: dict[str, tuple[int, ...]], stored: dict[str, Any],
                        tied: bool) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(names the config implies but not stored, names stored but not implied, (name, stored shape,
    implied shape) that differ). A tied head (`lm_head.weight` with tied embeddings) may be absent."""
    missing = [n for n in expected if n not in stored and not (tied and n.endswith("lm_head.weight"))]
    unexpected = [n for n in stored if n not in expected]
    shapes = [(n, tuple(stored[n].shape), tuple(shape)) for n, shape in expected.items()
              if n in stored and tuple(stored[n].shape) != tuple(shape)]
    return missing, unexpected, shapes
