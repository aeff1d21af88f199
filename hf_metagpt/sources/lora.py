"""PEFT LoRA adapters as fine-tunes: task vectors Δ = s·B·A, norms without forming Δ.

An adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is read with peft's own
config class and becomes an `AdapterInfo`: for each base parameter it updates, either a low-rank
update (`LoraModule`) or a full tensor that replaces the base's (`modules_to_save`, or the
`base_layer` weights peft saves beside embedding LoRAs). Every other parameter has τ = 0 and is
never read.

The engine asks an `AdapterSource` (an `engine.tasks.TaskSource`) for what it needs, one tensor at a
time: the task vector (formed in float32, only when the method must see it) or the exact squared
norm, which for a LoRA update is

    ‖s·B·A‖² = s² · trace((BᵀB)(AAᵀ))

with two r×r Gram matrices in float64 — the full Δ is never formed for MetaGPT's λ.

`--output-format lora` writes one exact adapter instead of a full model (`engine.adapter_output`):
stacking ranks, Σt ct·st·Bt·At = [c1 s1 B1 | c2 s2 B2 | …] · [A1; A2; …], with scaling 1.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import IncompatibleModelsError, InputError, UnsupportedAdapterError
from ..safetensors_io import TensorMeta, read_header
from .model import ModelInfo
from .refs import ModelRef

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ENERGY_FILE = "lora_rank_energy.json"
#: peft's prefix for the wrapped model's parameters in saved adapters (adapter name already removed).
PREFIX = "base_model.model."
# Stored factor names: (A suffix, B suffix, Δ is transposed). Embedding LoRAs store A as
# (r, num_embeddings) and B as (dim, r), and peft's Embedding.get_delta_weight transposes B·A.
_FACTORS = ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True))
# Init schemes that change the base weights themselves (the adapter is only valid on that changed
# base); peft converts them to plain LoRA (init_lora_weights=True) when saved with
# `path_initial_model_for_weight_conversion`.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoraConfig options whose update is not s·B·A on the base's own weights (or not a weight update).
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA with a bias on lora_B",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "Activated LoRA (aLoRA), whose update depends on the input",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron-parallel LoRA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
#: methods whose merge is θ0 + Σ ct τt, so a merged adapter can be exact.
LORA_OUTPUT_METHODS = ("metagpt", "task_arithmetic", "linear")



def is_adapter_folder(folder: Path | None) -> bool:
    """A folder holding a PEFT adapter (`adapter_config.json`) rather than a full model.

    A full model with an adapter beside it (some fine-tune repos keep both) is the full model, as on the Hub.
    """
    from .local import INDEX_FILE, SINGLE_FILE

    return (folder is not None and (folder / ADAPTER_CONFIG).is_file()
            and not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file())


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: base parameter `param` += scale · B·A (transposed when `transposed`)."""

    module: str  # the module's name in the base model, e.g. model.layers.0.self_attn.q_proj
    param: str  # the base parameter it updates: `<module>.weight`
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    transposed: bool


@dataclass(frozen=True)
class AdapterInfo(ModelInfo):
    """A LoRA adapter as an input: `tensors` are its stored tensors, `lora`/`full` map them to the base."""

    peft_config: Any = None
    lora: dict[str, LoraModule] = field(default_factory=dict)  # base param -> update
    full: dict[str, str] = field(default_factory=dict)  # base param -> stored key of a replacing tensor
    base_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # set by checked_against

    @property
    def base_model_name(self) -> str | None:
        return getattr(self.peft_config, "base_model_name_or_path", None) or None

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self.full:
            return self.tensors[self.full[name]].shape
        return self.base_shapes[name]

    def checked_against(self, base: ModelInfo, strict: bool, warnings: list[str]) -> "AdapterInfo":
        """This adapter with the base's shapes, once every update lands on a floating base parameter of
        the same shape (the base should be the adapter's own: a warning, or an error when `strict`)."""
        _check_base_name(self, base, strict, warnings)
        for param, m in self.lora.items():
            meta = _base_param(self, base, param)
            a, b = self.tensors[m.a_key].shape, self.tensors[m.b_key].shape
            shape = (a[1], b[0]) if m.transposed else (b[0], a[1])
            if tuple(meta.shape) != shape:
                raise IncompatibleModelsError(
                    f"{self.name}: the LoRA update of {param!r} has shape {list(shape)}, the base "
                    f"{base.name} stores it as {list(meta.shape)}.",
                    hint="The adapter was trained on another base model; pass the base it was trained on.")
        for param, key in self.full.items():
            meta = _base_param(self, base, param)
            shape = self.tensors[key].shape
            vocab_ok = param.endswith(("embed_tokens.weight", "lm_head.weight")) and shape[1:] == meta.shape[1:]
            if tuple(shape) != tuple(meta.shape) and not vocab_ok:
                raise IncompatibleModelsError(
                    f"{self.name}: saved module {param!r} has shape {list(shape)}, the base has {list(meta.shape)}.",
                    hint="The adapter was trained on another base model; pass the base it was trained on.")
        return replace(self, base_shapes={n: tuple(m.shape) for n, m in base.tensors.items()})


def _base_param(ad: AdapterInfo, base: ModelInfo, param: str) -> TensorMeta:
    meta = base.tensors.get(param)
    if meta is None:
        raise IncompatibleModelsError(
            f"{ad.name} updates {param!r}, which the base {base.name} does not have.",
            hint="The adapter was trained on another architecture; pass the base it was trained on.")
    if not meta.is_floating:
        raise IncompatibleModelsError(f"{ad.name} updates the integer tensor {param!r} of the base.")
    return meta


def _norm_name(text: str) -> str:
    return text.strip().rstrip("/").lower()


def _check_base_name(ad: AdapterInfo, base: ModelInfo, strict: bool, warnings: list[str]) -> None:
    """Compare `base_model_name_or_path` with the base: same Hub ID, same folder, or same last path part.

    Lenient on purpose: an adapter trained on `meta-llama/Llama-2-7b-hf` is normally merged onto a
    local copy named `Llama-2-7b-hf`. Shapes are checked separately and always.
    """
    want = ad.base_model_name
    if not want:
        warnings.append(f"{ad.name} does not record its base model (base_model_name_or_path); "
                        f"assuming {base.name}")
        return
    names = {_norm_name(n) for n in (base.ref.repo_id, base.ref.spec, base.config.get("_name_or_path")) if n}
    if base.ref.local_path is not None:
        names.add(_norm_name(str(base.ref.local_path)))
    if _norm_name(want) in names:
        return
    if Path(want).expanduser().is_dir() and base.ref.local_path is not None \
            and Path(want).expanduser().resolve() == base.ref.local_path.resolve():
        return
    tail = _norm_name(want.split("@")[0]).split("/")[-1]
    if tail and tail in {n.split("/")[-1] for n in names}:
        return
    msg = f"{ad.name} was trained on {want!r}, not on the base {base.name}"
    if strict:
        raise IncompatibleModelsError(msg + ".", hint="Pass the adapter's own base with --base, or drop --strict "
                                                      "to merge anyway (shapes are still checked).")
    warnings.append(msg + " (shapes match; --strict refuses this)")


# ---------------------------------------------------------------- reading an adapter folder

def load_adapter_info(ref: ModelRef, folder: Path | None = None) -> AdapterInfo:
    """Read an adapter's config with peft and its safetensors header (no tensor data)."""
    folder = Path(folder or ref.local_path)  # type: ignore[arg-type]
    ref = replace(ref, is_adapter=True)
    cfg = _read_config(folder, ref.display)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / ADAPTER_PICKLE).is_file():
            raise InputError(f"{ref.display}: only a pickle adapter ({ADAPTER_PICKLE}); hf-metagpt never unpickles files.",
                             hint="Re-save it with peft in a trusted environment: "
                                  "`PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`.")
        raise InputError(f"{ref.display}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}.",
                         hint="Point at a complete PEFT adapter folder (save_pretrained output).")
    tensors = read_header(weights, ADAPTER_WEIGHTS)
    lora, full = _map_keys(ref.display, cfg, tensors)
    if not lora and not full:
        raise InputError(f"{ref.display}: the adapter holds no LoRA weights.")
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    # The config is part of the task vector (alpha, ranks), so it is fingerprinted with the weights.
    return AdapterInfo(ref=ref, config=raw, tensors=tensors, weight_files=[ADAPTER_WEIGHTS, ADAPTER_CONFIG],
                       peft_config=cfg, lora=lora, full=full)


def _read_config(folder: Path, name: str):
    from peft import PeftConfig, PeftType

    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft raises ValueError/TypeError/KeyError for configs it cannot read
        raise UnsupportedAdapterError(f"{name}: peft cannot read {ADAPTER_CONFIG} ({exc}).",
                                      hint="Is it a PEFT adapter saved by a compatible peft version?") from None
    if cfg.peft_type != PeftType.LORA:
        kind = getattr(cfg.peft_type, "value", cfg.peft_type)
        raise UnsupportedAdapterError(
            f"{name}: a {kind} adapter; only LoRA adapters (peft_type LORA) can be merged.",
            hint="Other PEFT types (AdaLoRA, IA3, LoHa, LoKr, prompt/prefix tuning, ...) are not supported; "
                 "merge it into its base with peft (merge_and_unload) and pass the full model instead.")
    for attr, what in _VARIANTS.items():
        if getattr(cfg, attr, None):
            raise UnsupportedAdapterError(
                f"{name}: uses {what} ({attr}); only plain LoRA (Δ = s·B·A) is supported.",
                hint="Merge it into its base with peft (merge_and_unload) and pass the full model instead.")
    init = str(getattr(cfg, "init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"{name}: initialised with {init!r}, which changes the base weights; the adapter is only valid "
            f"on that modified base.",
            hint="Convert it to plain LoRA with peft (save_pretrained(..., "
                 "path_initial_model_for_weight_conversion=...)) first.")
    _check_ranks(cfg, name)
    if getattr(cfg, "bias", "none") not in ("none", None):
        # bias='all'/'lora_only' saves trained biases as full tensors; they are handled as such.
        log.info("%s: trained biases (bias=%s) are merged as full tensors", name, cfg.bias)
    return cfg


#: the largest LoRA scale (lora_alpha / r, or / √r with rsLoRA) taken as real: training never comes near it,
#: and far larger ones overflow the merged weights (which would then look like a broken base)
MAX_LORA_SCALE = 1e5


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_ranks(cfg, name: str) -> None:
    """r, lora_alpha, rank_pattern and alpha_pattern as peft uses them: positive whole ranks, finite alphas,
    patterns as mappings; each rank/alpha pair gives a scale below `MAX_LORA_SCALE`."""
    hint = f"Fix {ADAPTER_CONFIG} (r and rank_pattern: positive whole numbers; lora_alpha and alpha_pattern: numbers)."

    def rank(v: object, where: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UnsupportedAdapterError(f"{name}: {ADAPTER_CONFIG} gives {where}={v!r}; a LoRA rank must be a "
                                          f"positive whole number.", hint=hint)
        return v

    def alpha(v: object, where: str) -> float:
        if not _is_number(v):
            raise UnsupportedAdapterError(f"{name}: {ADAPTER_CONFIG} gives {where}={v!r}; lora_alpha must be a "
                                          f"finite number.", hint=hint)
        return float(v)  # type: ignore[arg-type]

    patterns = {}
    for attr in ("rank_pattern", "alpha_pattern"):
        value = getattr(cfg, attr, None) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UnsupportedAdapterError(f"{name}: {ADAPTER_CONFIG} gives {attr} as {value!r}; it must map "
                                          f"module names to values.", hint=hint)
        patterns[attr] = value
    ranks = [rank(cfg.r, "r")] + [rank(v, f"rank_pattern[{k!r}]") for k, v in patterns["rank_pattern"].items()]
    alphas = [alpha(cfg.lora_alpha, "lora_alpha")] + [alpha(v, f"alpha_pattern[{k!r}]")
                                                       for k, v in patterns["alpha_pattern"].items()]
    root = math.sqrt if getattr(cfg, "use_rslora", False) else float
    scale = max(abs(a) for a in alphas) / root(min(ranks))
    if scale > MAX_LORA_SCALE:
        raise UnsupportedAdapterError(
            f"{name}: {ADAPTER_CONFIG}'s lora_alpha {max(alphas, key=abs):g} with rank {min(ranks)} scales the update "
            f"by {scale:.3g}, far beyond any trained adapter (at most {MAX_LORA_SCALE:g} is accepted).", hint=hint)


def _map_keys(name: str, cfg, tensors: dict[str, TensorMeta]) -> tuple[dict[str, LoraModule], dict[str, str]]:
    from peft.utils.other import get_pattern_key

    lora: dict[str, LoraModule] = {}
    full: dict[str, str] = {}
    seen: set[str] = set()
    for key in tensors:
        if not key.startswith(PREFIX):
            raise UnsupportedAdapterError(f"{name}: unexpected tensor {key!r} (not under {PREFIX!r}).",
                                          hint="Only adapters saved by peft's save_pretrained are supported.")
        rest = key[len(PREFIX):]
        for a_suf, b_suf, transposed in _FACTORS:
            if rest.endswith(a_suf) or rest.endswith(b_suf):
                module = rest[: -len(a_suf if rest.endswith(a_suf) else b_suf)]
                if module in seen:
                    break
                seen.add(module)
                a_key, b_key = PREFIX + module + a_suf, PREFIX + module + b_suf
                if a_key not in tensors or b_key not in tensors:
                    raise InputError(f"{name}: {module} has only one of its LoRA factors.",
                                     hint="The adapter file is incomplete; re-save it.")
                # peft's own rule (LoraModel._create_and_replace): per-module r and alpha from the
                # first matching rank_pattern / alpha_pattern key.
                r = cfg.rank_pattern.get(get_pattern_key(list(cfg.rank_pattern or {}), module), cfg.r)
                alpha = cfg.alpha_pattern.get(get_pattern_key(list(cfg.alpha_pattern or {}), module), cfg.lora_alpha)
                a, b = tensors[a_key].shape, tensors[b_key].shape
                if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
                    raise UnsupportedAdapterError(
                        f"{name}: {module} stores factors {list(a)} and {list(b)}, not rank {r} as its config says.",
                        hint="Only linear and embedding LoRA layers with the configured rank are supported "
                             "(no convolution LoRA).")
                scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
                param = module + ".weight"
                lora[param] = LoraModule(module, param, a_key, b_key, r, float(alpha), scale,
                                         transposed or bool(cfg.fan_in_fan_out))
                break
        else:
            if ".lora_" in rest:
                raise UnsupportedAdapterError(f"{name}: unknown LoRA tensor {key!r}.",
                                              hint="Only plain LoRA factors (lora_A/lora_B) are supported.")
            # A full tensor: modules_to_save (saved under the module's own name) or the base
            # weights peft saves beside embedding LoRAs (`.base_layer.`): the fine-tune loads it
            # over the base's, so τ = saved − base (plus any LoRA update of the same module).
            full[rest.replace(".base_layer.", ".")] = key
    return lora, full
