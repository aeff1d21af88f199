"""Layer maps (mergekit's `slices:`): output layer j of an input reads that input's layer map[j].

A layer map turns an input into a *view* of it: the same files and byte ranges, its layer
tensors renamed to the output layers they feed (`model.layers.5.*` read as `model.layers.2.*`),
its config saying the output's layer count. The plan, the pieces and the executor then see an
ordinary input, so an output layer is read and merged like any block — one block at a time,
memory bounded as for any merge — and layers may repeat (stacking) or be left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Sequence

from ..errors import InputError, RecipeError
from ..sources.architecture import split_block
from ..sources.model import ModelInfo

#: config fields with one entry per layer (remapped with the layers)
_PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


def check_layers(layers: object, n_inputs: int) -> list[list[int]] | None:
    """`MergeOptions.layers` checked: one map per input (the base first), all of one length."""
    if layers is None:
        return None
    if (not isinstance(layers, list) or len(layers) != n_inputs
            or not all(isinstance(m, list) and m for m in layers)):
        raise RecipeError(f"layers must hold one layer map per input ({n_inputs}: the base, then each fine-tune).",
                          hint="Each map lists the input layer that every output layer reads, e.g. [0, 1, 2, 2, 3].")
    if len({len(m) for m in layers}) > 1:
        raise RecipeError("The layer maps have different lengths: every input must feed every output layer.")
    for m in layers:
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in m):
            raise RecipeError(f"A layer map holds something other than layer numbers: {m!r}.")
    return layers


def layer_prefix(info: ModelInfo) -> str | None:
    """The name prefix of the model's layer stack (`model.layers.`), the one with the most tensors."""
    counts = Counter(b[0] for name in info.tensors if (b := split_block(name)))
    return counts.most_common(1)[0][0] if counts else None


def describe_map(layer_map: Sequence[int]) -> str:
    """[0, 1, 2, 1, 2, 3] -> '0-2, 1-3'."""
    runs: list[list[int]] = []
    for k in layer_map:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def layer_view(info: ModelInfo, layer_map: Sequence[int]) -> ModelInfo:
    """`info` read through `layer_map` (see the module docstring)."""
    n = info.config.get("num_hidden_layers")
    prefix = layer_prefix(info)
    if prefix is None or not isinstance(n, int):
        raise InputError(f"{info.name} has no numbered layers (`*.layers.N.*`) to take layer ranges of.",
                         hint="slices/layer_range need a transformer with numbered layers; list the model under `models:` instead.")
    past = [k for k in layer_map if k >= n]
    if past:
        raise InputError(f"A layer_range takes layer {max(past)} of {info.name}, which has {n} layers (0-{n - 1}).",
                         hint=f"Keep layer_range within [0, {n}] for this model.")
    by_layer: dict[int, list[tuple[str, str]]] = {}
    tensors = {}
    for name, meta in info.tensors.items():
        b = split_block(name)
        if b and b[0] == prefix:
            by_layer.setdefault(b[1], []).append((name, b[2]))
        else:
            tensors[name] = meta
    for j, k in enumerate(layer_map):
        for name, rest in by_layer.get(k, []):
            out = f"{prefix}{j}{rest}"
            tensors[out] = replace(info.tensors[name], name=out)
    config = dict(info.config)
    config["num_hidden_layers"] = len(layer_map)
    for key in _PER_LAYER_CONFIG:
        value = config.get(key)
        if isinstance(value, list) and len(value) == n:
            config[key] = [value[k] for k in layer_map]
    return replace(info, tensors=tensors, config=config)


def apply_layers(layers: list[list[int]] | None, base: ModelInfo, models: Sequence[ModelInfo]
                 ) -> tuple[ModelInfo, tuple[ModelInfo, ...], list[str]]:
    """The inputs as the layer maps read them, and notes saying which layers each output reads."""
    models = tuple(models)
    if layers is None:
        return base, models, []
    inputs = [base, *models]
    check_layers(layers, len(inputs))
    if all(m == list(range(info.config.get("num_hidden_layers") or -1)) for m, info in zip(layers, inputs)):
        return base, models, []  # every layer of every input, in order: an ordinary merge
    for info in inputs:
        if info.ref.is_adapter:
            raise InputError(f"{info.name} is a LoRA adapter: layer ranges of adapters are not supported.",
                             hint="Merge the adapter into its base first, or list whole models under `models:`.")
    views = [layer_view(info, m) for info, m in zip(inputs, layers)]
    seen: dict[str, str] = {}
    for info, m in zip(inputs, layers):
        seen.setdefault(info.name, describe_map(m))
    notes = [f"{len(layers[0])} output layers (the input has {base.config.get('num_hidden_layers')}); "
             + "; ".join(f"{name} layers {desc}" for name, desc in seen.items())]
    return views[0], tuple(views[1:]), notes
