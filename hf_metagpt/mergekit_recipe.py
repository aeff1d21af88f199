"""mergekit's YAML recipe format, read into our recipe values (`--recipe` with a `merge_method` key).

A mergekit recipe names `merge_method`, `base_model`, `models` (each `model:` with optional
`parameters:`), top-level `parameters`, `dtype`, `out_dtype` and `tokenizer_source`/`tokenizer`.
It becomes our options: `method`, `base`, `models` (the fine-tunes), `parameters` (weights per
fine-tune, the method's parameters, `per_model` overrides) and `dtype`. Parameter values keep
mergekit's syntax (a number, a list interpolated across the layers, `- filter:` entries); the
methods resolve them per tensor (`methods/settings.py`).

What differs, by design:

- mergekit computes in its `dtype` and writes `out_dtype` (else `dtype`). Its methods here take
  mergekit's steps in that dtype (`mergekit_order`, `methods/mergekit_order.py`), so their outputs
  are mergekit's bits; `--arithmetic own` merges with our float64/float32 sums instead.
- `slices:` become layer maps (`MergeOptions.layers`, `engine/layers.py`) and per-layer parameter
  filters; passthrough stacking becomes linear with 0/1 weights per layer (`Slices`).
- `tokenizer_source`/`tokenizer.source` set `vocabulary` (`sources/vocab.py`): the rows follow the
  tokenizer, as in mergekit; `chat_template` is `sources/chat_template.py`'s; `model+adapter`
  references are applied before the merge (`sources/lora_applied.py`).
- Keys and parameters mergekit ignores are warnings naming their line (it ignores them too);
  mergekit's refusals (no base_model where one is needed, a model without weight) stay refusals.
- `metagpt` (and `metagpt_ties`, `metagpt_dare`) are our extension, with `granularity` as a
  top-level parameter.

This module reads text; it never imports mergekit (LGPL) and shares none of its code.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import RecipeError
from .dtype_names import ST_TO_CONFIG

log = logging.getLogger("hf_metagpt")

#: mergekit's methods that we run, and which parameters each takes (mergekit's names).
_GTA = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask")
MERGEKIT_METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "lambda", "normalize", "rescale", "int8_mask", "density"),
    "ties": _GTA,
    "dare_ties": _GTA,
    "dare_linear": _GTA,
    "breadcrumbs": (*_GTA, "gamma"),
    "breadcrumbs_ties": (*_GTA, "gamma"),
    "della": (*_GTA, "epsilon"),
    "della_linear": (*_GTA, "epsilon"),
    "slerp": ("t",),
    "model_stock": ("filter_wise",),
    "sce": ("select_topk", "int8_mask"),
    "nuslerp": ("weight", "nuslerp_flatten", "nuslerp_row_wise"),
    "karcher": ("max_iter", "tol"),
    "arcee_fusion": (),
    # our extension
    "metagpt": ("granularity",),
    "metagpt_ties": ("granularity", "density", "majority_sign_method"),
    "metagpt_dare": ("granularity", "density"),
}
#: Methods for which mergekit stops when a model has no `weight` (the base excepted)
_WEIGHT_REQUIRED = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear")
#: Methods whose `density` defaults to 1 in mergekit (keep everything).
_MERGEKIT_DENSITY_DEFAULT = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
#: Methods that take parameters per model (the others only method-wide ones).
_PER_MODEL_METHODS = ("linear", "task_arithmetic", "nuslerp", *_MERGEKIT_DENSITY_DEFAULT)
#: Parameters that mergekit sets per model (NON_BASE scope); the others are method-wide.
_PER_MODEL = {"weight", "density", "gamma", "epsilon"}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "slices", "chat_template")
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
_REFUSED = {
    "passthrough": "passthrough stacks layers from several models (a frankenmerge); hf-metagpt merges "
                   "models of one architecture tensor by tensor.",
}
#: mergekit methods we do not compute, and what mergekit would have done (said when we refuse)
_NOT_HERE = {
    "multislerp": "mergekit would interpolate several models on the sphere around their weighted mean",
    "nearswap": "mergekit would move the base toward the other model where they are close: "
                "w = clamp(t / |θ0 − θ1|, 0, 1), w·θ1 + (1 − w)·θ0",
}


#: every parameter name some mergekit method takes (a top-level one is a misplaced parameter)
_ALL_PARAMETERS = {p for ps in MERGEKIT_METHODS.values() for p in ps} | {"t", "scale", "int8_mask", "normalize"}


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def where(self, node: yaml.Node) -> str:
        return f"{self.source}, line {node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str, hint: str | None = None) -> RecipeError:
        return RecipeError(f"{message} ({self.where(node)}).", hint=hint)

    def warn(self, node: yaml.Node, message: str) -> None:
        """Something mergekit accepts and ignores: said, not refused."""
        log.warning("warning: %s (%s)", message, self.where(node))

    def value(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader("").construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if what == "parameters" and isinstance(node, yaml.ScalarNode) and self.value(node) is None:
            return {}  # `parameters:` with nothing under it (mergekit reads it as none)
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = str(self.value(k))
            if key in out:
                raise self.fail(k, f"Key {key!r} of {what} is given twice", hint="Keep one of them.")
            out[key] = (k, v)
        return out

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, f"{what} must be a model reference (a Hub ID or a folder), got {value!r}")
        return value.strip()


def parse_mergekit(text: str, source: str = "<recipe>") -> dict[str, Any]:
    """mergekit recipe text → our recipe values (keys of `MergeOptions`); errors name the line."""
    r = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    if root is None:
        raise RecipeError(f"Recipe {source} is empty.")
    top = r.mapping(root, "the recipe")
    module_params = _lift_default_module(r, top)
    method = _method(r, top, root)
    accepted = MERGEKIT_METHODS.get(method, _PASSTHROUGH)
    base = r.text(top["base_model"][1], "base_model") if "base_model" in top else None
    globals_ = _parameters(r, top["parameters"][1], accepted, method, per_model=False) if "parameters" in top else {}
    if module_params is not None:  # modules.default's own parameters, over the top-level ones
        own = _parameters(r, module_params, accepted, method, per_model=False)
        globals_ = {**globals_, **{k: _chain(v, globals_.get(k)) for k, v in own.items()}}
    sliced = "slices" in top
    method, accepted, entries, globals_, mnode, layer_maps = _inputs(r, top, root, method, accepted, globals_, base)
    method, entries, globals_ = _mergekit_input_rules(r, top, method, base, entries, globals_, mnode, sliced)
    out: dict[str, Any] = {"method": method}
    refs = [_ref(r, spec, base, node) for spec, _, node in entries]
    base_spec = base
    base, tunes = _fine_tunes(r, method, base, refs, mnode, root)
    out["base"] = base
    out["models"] = [refs[i] for i in tunes]
    if layer_maps is not None:
        # one layer map per input, in the order the plan reads them: the base, then each fine-tune
        specs = [spec for spec, _, _ in entries]
        base_map = layer_maps[specs.index(base_spec)] if base_spec in specs else layer_maps[0]
        out["layers"] = [base_map, *(layer_maps[i] for i in tunes)]
    granularity = globals_.pop("granularity", None)
    if granularity is not None:
        out["granularity"] = granularity
    if method in _WEIGHT_REQUIRED and "weight" not in globals_:
        for i in tunes:
            if "weight" not in entries[i][1]:
                raise r.fail(entries[i][2], f"Model {entries[i][0]!r} has no weight",
                             hint=f"mergekit's {method} needs a weight for every model (it stops with 'Missing required "
                                  "parameter weight'): add `weight:` under its `parameters:`, or one in the top-level `parameters:`.")
    params = _method_parameters(method, accepted, globals_, entries, tunes)
    if method == "nuslerp" and base_spec is None:
        params["task_vectors"] = False  # no base_model: mergekit interpolates the two models themselves
    if method in MERGEKIT_ORDER:
        # mergekit computes in its `dtype` (else in the inputs' dtype), rounding at every step where
        # our kernels accumulate in float64: take its steps, so the outputs are its bits
        # (`methods/mergekit_order.py`; `--arithmetic own` for ours).
        params["mergekit_order"] = _compute_dtype(r, top)
    if params:
        out["parameters"] = params
    out.update(_output_keys(r, top, method, params, base, refs, tunes))
    return out


def _inputs(r: "_Reader", top: dict, root: yaml.Node, method: str, accepted, globals_: dict, base: str | None):
    """The recipe's inputs as (spec, parameters, node) entries, from `models:` or `slices:` (which may
    change the method, e.g. a passthrough stack, and give each input a layer map)."""
    if "slices" in top:
        if "models" in top:
            raise r.fail(top["slices"][0], "The recipe gives both `slices` and `models`",
                         hint="mergekit takes one of them: list whole models under `models:`, or layer ranges under `slices:`.")
        mnode = top["slices"][1]
        layout = read_slices(r, mnode, accepted, method)
        method, entries, globals_ = layout.translate(method, globals_, base)
        return method, MERGEKIT_METHODS.get(method, accepted), entries, globals_, mnode, layout.maps
    if "models" not in top:
        raise r.fail(root, "The mergekit recipe lists no `models`",
                     hint="Add `models:` with one `- model: ...` per model (or `slices:` with layer ranges).")
    mnode = top["models"][1]
    return method, accepted, _entries(r, mnode, accepted, method), globals_, mnode, None


def _mergekit_input_rules(r: "_Reader", top: dict, method: str, base: str | None, entries: list, globals_: dict,
                          mnode: yaml.Node, sliced: bool):
    """What mergekit 0.1.5 does with a base_model the inputs do not list (adds it, refuses, or writes
    it alone): the (method, entries, global parameters) that give its bytes."""
    listed = [spec for spec, _, _ in entries]
    if method == "linear" and base is not None and base not in listed and not sliced:
        # mergekit's linear averages every input, base_model included when `models` does not list it
        # (it adds the base to `models`, not to slices' sources: a sliced linear leaves it out)
        entries = [(base, {}, top["base_model"][1]), *entries]
    if method == "karcher" and not sliced and base is not None and base not in listed:
        # so does its karcher, with base_model after the listed models (checked: same bytes)
        entries = [*entries, (base, {}, top["base_model"][1])]
    if sliced and base is not None and base not in listed and method not in ("linear", "nuslerp"):
        raise r.fail(top["slices"][1], f"base_model {base!r} is not a source of the slices",
                     hint="mergekit 0.1.5 refuses this recipe too ('Base input is not present in merge inputs'): "
                          "add base_model as a source of each slice, with the same layer_range as the others.")
    if (method in _WEIGHT_REQUIRED and method != "linear" and base is not None
            and all(spec == base for spec, _, _ in entries)):
        # Only the base (often `model+adapter`: a LoRA baked into its model): mergekit 0.1.5 writes
        # base_model itself (no task vector to add; checked: the base's bytes). Here: a linear merge
        # of that one model with weight 1, the same bytes.
        r.warn(mnode, f"the recipe lists no model besides base_model: mergekit 0.1.5's {method} writes base_model "
                      "itself (with its LoRA applied, for `model+adapter`), and so does this merge")
        return "linear", [(base, {"weight": 1.0}, entries[0][2])], {}
    return method, entries, globals_


def _output_keys(r: "_Reader", top: dict, method: str, params: dict, base, refs, tunes) -> dict[str, Any]:
    """The output's dtype, chat template and tokenizer/vocabulary keys of a recipe."""
    out: dict[str, Any] = {}
    if dtype := _dtype(r, top):
        out["dtype"] = dtype
    if method == "arcee_fusion" and "out_dtype" not in top and params.get("mergekit_order") in ("bfloat16", "float16"):
        # mergekit's fusion mask is float32, so base + mask·δ is float32 and written so (`arcee_fusion.py`)
        out["dtype"] = "float32"
    if "chat_template" in top:
        node = top["chat_template"][1]
        value = r.value(node)
        if not isinstance(value, str) or not value.strip():
            raise r.fail(node, f"chat_template must be auto, a template name or the template text, got {value!r}")
        out["chat_template"] = value
    tok = _tokenizer(r, top, base, refs, tunes)
    if tok is not None:
        # mergekit: the output's vocabulary rows are the tokenizer's tokens (`sources/vocab.py`)
        out["vocabulary"] = "union" if tok == "union" else "tokenizer"
        if tok != "union":
            out["tokenizer_source"] = tok
    return out


def _lift_default_module(r: "_Reader", top: dict) -> yaml.Node | None:
    """`modules: {default: {...}}` (mergekit's one module of a single-module model) as the top level.

    mergekit 0.1.5 names the one module of a causal LM `default`: its `slices`/`models` are the merge's,
    its `parameters` take precedence over the top-level ones (checked: the same bytes as the recipe
    written without `modules:`). Other module names (a vision tower, a text decoder of a multimodal
    model) are refused saying what mergekit does with them.
    """
    if "modules" not in top:
        return None
    kn, vn = top.pop("modules")
    modules = r.mapping(vn, "modules")
    names = list(modules)
    if names != ["default"]:
        raise r.fail(kn, f"mergekit `modules` {names} (a merge per module of a multi-module model) is not supported",
                     hint="mergekit 0.1.5 merges each named module of a multimodal architecture (a text decoder, a vision "
                          "tower) with its own slices; hf-metagpt reads only `modules: {default: ...}`, the one module of a "
                          "causal LM. Merge such a model with mergekit, or write the recipe without `modules:`.")
    mkn, mvn = modules["default"]
    fields = r.mapping(mvn, "modules.default")
    for key, (fk, fv) in fields.items():
        if key not in ("slices", "models", "parameters"):
            raise r.fail(fk, f"Unknown key {key!r} in modules.default",
                         hint="A module has `slices:` or `models:`, and `parameters:`.")
        if key in ("slices", "models") and ("slices" in top or "models" in top):
            raise r.fail(fk, f"The recipe gives `{key}` both at the top and under modules.default",
                         hint="Give the models once: at the top, or under `modules: default:`.")
    for key in ("slices", "models"):
        if key in fields:
            top[key] = fields[key]
    return fields["parameters"][1] if "parameters" in fields else None


def _method(r: "_Reader", top: dict, root: yaml.Node) -> str:
    """The recipe's merge_method, after refusing unknown top-level keys and `slices`."""
    for key, (k, _) in list(top.items()):
        if key not in _TOP_KEYS:
            where = ("mergekit reads it only under `parameters:`" if key in _ALL_PARAMETERS
                     else "it is not a mergekit key")
            r.warn(k, f"recipe key {key!r} is ignored: {where}, and mergekit 0.1.5 ignores it too{_did_you_mean(key, _TOP_KEYS)}")
            del top[key]
    if "merge_method" not in top:
        raise r.fail(root, "The mergekit recipe has no `merge_method`",
                     hint="Add e.g. `merge_method: ties`, or read it as an hf-metagpt recipe (--recipe-format auto).")
    _, v = top["merge_method"]
    method = r.value(v)
    if not isinstance(method, str):
        raise r.fail(v, f"merge_method must be a method name, got a {type(method).__name__}: {method!r}",
                     hint=f"Write one name, e.g. `merge_method: ties` (supported: {', '.join(MERGEKIT_METHODS)}).")
    if method == "passthrough" and "slices" in top:
        return method  # layer stacking: `Slices.translate` makes it a merge of 0/1 weights per layer
    if method in _REFUSED:
        raise r.fail(v, f"merge_method {method!r} is not supported: {_REFUSED[method]}")
    if method in _NOT_HERE:
        raise r.fail(v, f"merge_method {method!r} is not supported: {_NOT_HERE[method]}",
                     hint=f"Run this recipe with mergekit itself, or choose one of: {', '.join(MERGEKIT_METHODS)}.")
    if method not in MERGEKIT_METHODS:
        raise r.fail(v, f"merge_method {method!r} is not supported",
                     hint=f"Supported: {', '.join(MERGEKIT_METHODS)}.")
    return method


def _entries(r: "_Reader", mnode: yaml.Node, accepted: Any, method: str) -> list[tuple[str, dict[str, Any], yaml.Node]]:
    """(model spec, its parameters, its node) of each `models` entry."""
    if not isinstance(mnode, yaml.SequenceNode) or not mnode.value:
        raise r.fail(mnode, "`models` must be a non-empty list of `- model: ...` entries")
    entries: list[tuple[str, dict[str, Any], yaml.Node]] = []
    for item in mnode.value:
        if isinstance(item, yaml.ScalarNode):
            entries.append((r.text(item, "a model"), {}, item))
            continue
        fields = r.mapping(item, "a `models` entry")
        for key, (kn, _) in fields.items():
            if key not in ("model", "parameters"):
                r.warn(kn, f"key {key!r} of a `models` entry is ignored: mergekit reads only `model:` and "
                           f"`parameters:` there, and ignores it too{_did_you_mean(key, ('model', 'parameters'))}")
        if "model" not in fields:
            raise r.fail(item, "A `models` entry has no `model:`")
        params = _parameters(r, fields["parameters"][1], accepted, method, per_model=True) if "parameters" in fields else {}
        entries.append((r.text(fields["model"][1], "model"), params, item))
    return entries


def _fine_tunes(r: "_Reader", method: str, base: str | None, refs: list[str], mnode: yaml.Node,
                root: yaml.Node) -> tuple[str, list[int]]:
    """The base, and which listed models are the fine-tunes (mergekit lists the base among
    `models` for most methods; parameters given to the base's entry are ignored, as mergekit does)."""
    if method == "nuslerp" and len([x for x in refs if x != base]) != 2:
        raise r.fail(mnode, "nuslerp merges exactly two models (and, optionally, a base_model whose task vectors they give)",
                     hint="List two models under `models` (mergekit refuses other counts too).")
    if method in ("linear", "karcher") or (method == "nuslerp" and base is None):
        # Every listed model is averaged (the base too, when listed); θ0 is only the reference.
        # (nuslerp without base_model interpolates the two models themselves: `task_vectors: false`)
        return base or refs[0], list(range(len(refs)))
    if base is None:
        raise r.fail(root, f"merge_method {method!r} needs a base_model",
                     hint="Add `base_model:` (mergekit refuses this recipe too: 'Merge method requires a base input').")
    tunes = [i for i, ref in enumerate(refs) if ref != base]
    if method == "arcee_fusion" and len(tunes) != 1:
        raise r.fail(mnode, "arcee_fusion merges exactly two models: base_model and one other",
                     hint="List base_model and the other model under `models` (mergekit refuses other counts too).")
    if method == "slerp" and (len(tunes) != 1 or len(refs) > 2):
        # base_model need not be listed: mergekit adds it to the inputs (checked: the same bytes)
        raise r.fail(mnode, "slerp merges exactly two models: base_model and one other",
                     hint="List the other model under `models` (and, if you like, base_model too); mergekit "
                          "refuses this recipe too ('Merge method requires exactly 2 inputs').")
    if not tunes:
        raise r.fail(mnode, "The recipe lists no model besides base_model")
    return base, tunes


def _method_parameters(method: str, accepted: Any, globals_: dict[str, Any],
                       entries: list[tuple[str, dict[str, Any], yaml.Node]], tunes: list[int]) -> dict[str, Any]:
    """Our `parameters`: weights per fine-tune, method-wide values, and per-model values."""
    params: dict[str, Any] = {}
    if method == "task_arithmetic":
        globals_.pop("density", None)  # mergekit accepts it and ignores it (no sparsification)
        for _, p, _ in entries:
            p.pop("density", None)
    g_weight = globals_.pop("weight", None)
    per_weights = [entries[i][1].pop("weight", None) for i in tunes]
    if g_weight is not None or any(w is not None for w in per_weights):
        params["weights"] = [_chain(w, g_weight) for w in per_weights]
    if "density" in accepted and method in _MERGEKIT_DENSITY_DEFAULT and "density" not in globals_:
        globals_["density"] = 1.0  # mergekit's default (ours are the papers': 0.2 for ties, 0.5 for DARE)
    params.update(globals_)
    per_model = [{k: v for k, v in entries[i][1].items()} for i in tunes]
    if any(per_model):
        params["per_model"] = per_model
    return params


def _dtype(r: "_Reader", top: dict) -> str | None:
    dtype = None
    for key in ("dtype", "out_dtype"):  # out_dtype wins: it is what mergekit writes
        if key in top:
            dtype = _dtype_name(r, key, top[key][1])
    return dtype


def _dtype_name(r: "_Reader", key: str, node: Any) -> str:
    """The torch dtype name a recipe's `dtype`/`out_dtype` node names; a list, mapping or unknown name is refused."""
    name = r.value(node)
    if not isinstance(name, str):
        raise r.fail(node, f"{key} must be a dtype name, got a {type(name).__name__}: {name!r}",
                     hint="Use bfloat16, float16 or float32.")
    if name not in _DTYPES:
        raise r.fail(node, f"{key} {name!r} is not supported", hint="Use bfloat16, float16 or float32.")
    return _DTYPES[name]


#: methods with mergekit's arithmetic (`methods/mergekit_order.py`)
from .methods.mergekit_order import METHODS as MERGEKIT_ORDER  # noqa: E402


def _compute_dtype(r: "_Reader", top: dict) -> str:
    """What mergekit computes in: `dtype` (not `out_dtype`, which it only writes), else the inputs' dtype."""
    if "dtype" not in top:
        return "auto"
    return _dtype_name(r, "dtype", top["dtype"][1])


def _chain(own: Any, fallback: Any) -> Any:
    """One setting meaning "own, else fallback" (per-model parameters over the method-wide one)."""
    if own is None:
        return fallback
    if fallback is None or not _is_filter_list(own):
        return own
    tail = fallback if _is_filter_list(fallback) else [{"value": fallback}]
    return [*own, *tail]


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(e, dict) for e in value)


def _parameters(r: _Reader, node: yaml.Node, accepted: tuple[str, ...], method: str, *, per_model: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (kn, vn) in r.mapping(node, "parameters").items():
        if method == "passthrough" and key == "scale":
            value = _drop_entry_keys(r, vn, key, r.value(vn))
            _check_setting(r, vn, key, value)
            if not _numeric_setting(_at(value, 0.0)) or not _numeric_setting(_at(value, 1.0)):
                raise r.fail(vn, f"scale must be a number (or numbers per layer or per filter), got {value!r}")
            out[key] = value
            continue
        if key not in accepted:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no parameters"
            r.warn(kn, f"parameter {key!r} is ignored: merge_method {method} does not take it "
                       f"({takes}), and mergekit 0.1.5 ignores it too{_did_you_mean(key, accepted)}")
            continue
        if per_model and (key not in _PER_MODEL or method not in _PER_MODEL_METHODS):
            r.warn(kn, f"parameter {key!r} is ignored under a model: it applies to the whole merge (give it in the "
                       "top-level `parameters:`), and mergekit 0.1.5 ignores it there too")
            continue
        value = _as_bool(key, _drop_entry_keys(r, vn, key, r.value(vn)))
        _check_setting(r, vn, key, value)
        _check_value(r, vn, method, key, value, per_model)
        out[key] = value
    return out


def _check_value(r: _Reader, node: yaml.Node, method: str, key: str, value: Any, per_model: bool) -> None:
    """The method's own check of one value, reported at its line."""
    from .errors import MergeError
    from .methods import get_method

    if key == "granularity" or (method == "task_arithmetic" and key == "density"):
        return  # an option of the merge, checked with the others; a density task arithmetic ignores
    if key == "weight":
        trial = {"weights": [value]}
    elif per_model and key in _PER_MODEL:
        trial = {"per_model": [{key: value}]}
    else:
        trial = {key: value}
    try:
        get_method(method, **trial)
    except MergeError as exc:
        raise RecipeError(f"{exc.message.rstrip('.')} ({r.where(node)}).", hint=exc.hint) from None


#: mergekit's true/false parameters, and the values its configuration reads as true or false
#: (pydantic's booleans: `normalize: 1.0` is true, checked; 0.5 is refused by mergekit and here)
_BOOL_PARAMETERS = ("normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise")
_TRUE = (1, "1", "true", "t", "yes", "y", "on")
_FALSE = (0, "0", "false", "f", "no", "n", "off")


def _as_bool(key: str, value: Any) -> Any:
    if key not in _BOOL_PARAMETERS or isinstance(value, bool):
        return value
    probe = value.strip().lower() if isinstance(value, str) else value
    if isinstance(probe, (int, float, str)):
        if probe in _TRUE:
            return True
        if probe in _FALSE:
            return False
    return value


def _drop_entry_keys(r: _Reader, node: yaml.Node, key: str, value: Any) -> Any:
    """A filtered list without the keys mergekit ignores in its entries (it reads `filter` and `value`).

    mergekit 0.1.5 drops any other key of an entry, e.g. the `pattern:` of its own gradient-slerp example:
    that entry then has no filter and applies to every tensor (checked: the same bytes as the plain value).
    """
    if not isinstance(value, list) or not isinstance(node, yaml.SequenceNode):
        return value
    out = []
    for item, inode in zip(value, node.value):
        if isinstance(item, dict) and "value" in item:
            extra = sorted(str(k) for k in item if k not in ("filter", "value"))
            if extra:
                effect = ("this entry keeps its filter" if "filter" in item
                          else "this entry has no filter, so it applies to every tensor it reaches")
                r.warn(inode, f"key {extra[0]!r} of a filtered value of {key!r} is ignored: mergekit reads only `filter` "
                              f"and `value` there and ignores it too (a filter is written `filter: NAME`); "
                              f"{effect}")
                item = {k: v for k, v in item.items() if k in ("filter", "value")}
        out.append(item)
    return out


def _check_setting(r: _Reader, node: yaml.Node, key: str, value: Any) -> None:
    """Shape check with the line (the method checks the values themselves)."""
    if isinstance(value, dict):
        raise r.fail(node, f"Parameter {key!r} is a mapping",
                     hint="Give a value, a list of values across the layers, or a list of `- filter: ...` / `value: ...` entries.")
    if isinstance(value, list):
        for item, inode in zip(value, node.value):
            if isinstance(item, dict):
                unknown = set(item) - {"filter", "value"}
                if unknown or "value" not in item:
                    raise r.fail(inode, f"A filtered value of {key!r} must have `filter` and `value`, got {sorted(map(str, item))}")
                _check_setting(r, dict(node_items(inode))["value"], key, item["value"])


def node_items(node: yaml.Node):
    for k, v in node.value:
        yield str(k.value), v


def _ref(r: _Reader, spec: str, base: str | None, node: yaml.Node) -> str:
    """A model reference; `model+lora` is the LoRA adapter `lora` on `model`, which must be the base."""
    if "+" not in spec:
        return spec
    model, _, adapter = spec.partition("+")
    if not adapter:
        raise r.fail(node, f"Model {spec!r} has an empty LoRA part after '+'")
    if base is not None and model == base:
        return adapter  # a LoRA fine-tune of the base: its task vector is s·B·A (our LoRA path)
    return spec  # the adapter applied to that model before the merge (`sources/lora_applied.py`)


def _tokenizer(r: _Reader, top: dict, base: str | None, refs: list[str], tunes: list[int]) -> str | None:
    node = None
    value = None
    if "tokenizer_source" in top:
        node = top["tokenizer_source"][1]
        value = r.value(node)
    if "tokenizer" in top:
        tnode = top["tokenizer"][1]
        fields = r.mapping(tnode, "tokenizer")
        for key, (kn, vn) in fields.items():
            if key == "tokens" and r.value(vn) in (None, {}):
                continue
            if key == "tokens":
                raise r.fail(kn, "tokenizer.tokens (the embedding row of a named token, set by hand) is not supported",
                             hint="Leave it out: tokens every model has are merged, a token one model adds keeps that model's row.")
            if key != "source":
                raise r.fail(kn, f"tokenizer.{key} is not supported",
                             hint="Only tokenizer.source (base, union or a model) is read.")
        if "source" in fields:
            node = fields["source"][1]
            value = r.value(node)
    if node is None or value is None:
        return None
    if value == "base":
        return "base"
    if value == "union":
        return "union"
    spec = str(value)
    if spec.startswith("model:"):
        spec = spec[len("model:"):]
    if spec == base:
        return "base"
    if spec in [refs[i] for i in tunes]:
        return spec
    raise r.fail(node, f"tokenizer_source {value!r} is not one of the models",
                 hint="Use base or the `model:` of one of the models.")


# --------------------------------------------------------------------------- slices

#: passthrough's one parameter (a factor on the copied tensor); with slices it becomes a linear weight
_PASSTHROUGH = ("scale",)


@dataclass
class _Source:
    spec: str
    lo: int
    hi: int
    params: dict[str, Any]
    node: yaml.Node


@dataclass
class _Slice:
    sources: list[_Source]
    params: dict[str, Any]
    node: yaml.Node

    @property
    def length(self) -> int:
        return self.sources[0].hi - self.sources[0].lo


def read_slices(r: _Reader, node: yaml.Node, accepted: tuple[str, ...], method: str) -> "Slices":
    """mergekit's `slices:` (each a list of `sources`, each a `model` and its `layer_range`)."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise r.fail(node, "`slices` must be a non-empty list of `- sources: [...]` entries")
    slices = []
    for snode in node.value:
        fields = r.mapping(snode, "a slice")
        for key, (kn, _) in fields.items():
            if key not in ("sources", "parameters"):
                raise r.fail(kn, f"Unknown key {key!r} in a slice", hint="A slice has `sources:` and `parameters:`.")
        if "sources" not in fields:
            raise r.fail(snode, "A slice has no `sources`", hint="Add `sources:` with `- model: ...` and `layer_range: [start, end]`.")
        srcs_node = fields["sources"][1]
        if not isinstance(srcs_node, yaml.SequenceNode) or not srcs_node.value:
            raise r.fail(srcs_node, "`sources` must be a non-empty list of `- model: ...` entries")
        sources = []
        for src in srcs_node.value:
            f = r.mapping(src, "a slice source")
            for key, (kn, _) in f.items():
                if key not in ("model", "layer_range", "parameters"):
                    raise r.fail(kn, f"Unknown key {key!r} in a slice source",
                                 hint="A source has `model:`, `layer_range:` and `parameters:`.")
            if "model" not in f or "layer_range" not in f:
                raise r.fail(src, "A slice source needs `model:` and `layer_range: [start, end]`")
            rng = r.value(f["layer_range"][1])
            if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                    or rng[0] < 0 or rng[1] <= rng[0]):
                raise r.fail(f["layer_range"][1], f"layer_range must be [start, end] with 0 <= start < end, got {rng!r}",
                             hint="Layers start..end-1 are taken, as in Python's range.")
            params = _parameters(r, f["parameters"][1], accepted, method, per_model=True) if "parameters" in f else {}
            sources.append(_Source(r.text(f["model"][1], "model"), rng[0], rng[1], params, src))
        lengths = {s.hi - s.lo for s in sources}
        if len(lengths) > 1:
            raise r.fail(srcs_node, f"The sources of a slice cover different numbers of layers ({sorted(lengths)})",
                         hint="mergekit merges layer i of every source of a slice: give every layer_range the same length.")
        params = _parameters(r, fields["parameters"][1], accepted, method, per_model=False) if "parameters" in fields else {}
        slices.append(_Slice(sources, params, snode))
    return Slices(r, slices, node)


class Slices:
    """The output layers of a `slices:` recipe: which input layer of which model each one reads.

    Output layer j of the concatenated slices reads layer `lo + i` of every source of its slice
    (i its place in the slice). Tensors outside the layers (embeddings before, final norm and head
    after) come from the first slice's sources and the last slice's, with those slices' parameters
    at the slice's start (what mergekit 0.1.5 writes). A gradient list in a slice runs across that
    slice's layers: layer i of a slice of L takes it at i / (L − 1).

    We merge model by model, so every input is read for every output layer through a *layer map*
    (`MergeOptions.layers`: output layer j reads input layer map[j]); parameters become per-layer
    `- filter: layers.j.` settings. passthrough (each output layer copied from one source) becomes
    linear with weight 1 (or the source's `scale`) on that source and 0 on the others.
    """

    def __init__(self, r: _Reader, slices: list[_Slice], node: yaml.Node) -> None:
        self.r, self.slices, self.node = r, slices, node
        self.specs = list(dict.fromkeys(src.spec for sl in slices for src in sl.sources))
        self.maps: list[list[int]] = []
        self.positions: list[tuple[_Slice, float]] = []  # per output layer: its slice and its place in it
        for sl in slices:
            n = sl.length
            for i in range(n):
                self.positions.append((sl, i / (n - 1) if n > 1 else 0.0))

    @property
    def simple(self) -> bool:
        """One slice whose sources all read layers 0..n-1: `models:` with a layer count to check."""
        return len(self.slices) == 1 and all(s.lo == 0 for s in self.slices[0].sources)

    def _map(self, spec: str) -> list[int]:
        out = []
        fallback = next(s.lo for sl in self.slices for s in sl.sources if s.spec == spec)
        for sl in self.slices:
            src = next((s for s in sl.sources if s.spec == spec), None)
            out += list(range(src.lo, src.hi)) if src is not None else [fallback] * sl.length
        return out

    def translate(self, method: str, globals_: dict[str, Any], base: str | None
                  ) -> tuple[str, list[tuple[str, dict[str, Any], yaml.Node]], dict[str, Any]]:
        """(method, `models` entries, method-wide parameters) of the same merge; sets `self.maps`."""
        r = self.r
        for sl in self.slices:
            seen = [s.spec for s in sl.sources]
            if len(set(seen)) != len(seen):
                raise r.fail(sl.node, "A slice lists the same model twice",
                             hint="List each model once per slice.")
        self.maps = [self._map(spec) for spec in self.specs]
        nodes = {}
        for sl in self.slices:
            for s in sl.sources:
                nodes.setdefault(s.spec, s.node)
        if method == "passthrough":
            return self._passthrough(globals_, nodes)
        for sl in self.slices:
            missing = [spec for spec in self.specs if spec not in {s.spec for s in sl.sources}]
            if missing:
                raise r.fail(sl.node, f"This slice does not list {missing[0]!r}, which other slices merge",
                             hint="hf-metagpt merges the same models in every slice (layer ranges may differ); "
                                  "list every model in every slice, or use merge_method: passthrough to stack layers.")
        if self.simple:
            sl = self.slices[0]
            entries = [(s.spec, dict(s.params), s.node) for s in sl.sources]
            return method, entries, {**globals_, **sl.params}
        keys = sorted({k for sl in self.slices for s in sl.sources for k in s.params}
                      | {k for sl in self.slices for k in sl.params} | set(globals_))
        entries = []
        for spec in self.specs:
            if spec == base and method != "linear":
                params = {}  # the base's own parameters are not used (as mergekit)
            else:
                params = {k: v for k in keys if k in _PER_MODEL and (v := self._by_layer(k, globals_, spec)) is not None}
            entries.append((spec, params, nodes[spec]))
        out_globals = {k: v for k in keys if k not in _PER_MODEL and (v := self._by_layer(k, globals_, None)) is not None}
        return method, entries, out_globals

    def _value(self, sl: _Slice, key: str, globals_: dict[str, Any], spec: str | None) -> Any:
        own = None
        if spec is not None:
            src = next((s for s in sl.sources if s.spec == spec), None)
            own = src.params.get(key) if src is not None else None
        return _chain(own, _chain(sl.params.get(key), globals_.get(key)))

    def _by_layer(self, key: str, globals_: dict[str, Any], spec: str | None) -> Any:
        """One setting for every output tensor: per-layer filters, then the first and the last slice's."""
        first, last = self.slices[0], self.slices[-1]
        values = [_at(self._value(sl, key, globals_, spec), x) for sl, x in self.positions]
        pre = _at(self._value(first, key, globals_, spec), 0.0)
        post = _at(self._value(last, key, globals_, spec), 0.0)
        everything = [*values, pre, post]
        if all(v is None for v in everything):
            return None
        if all(v == everything[0] for v in everything):
            return everything[0]
        if any(v is None for v in everything):
            raise self.r.fail(self.node, f"Parameter {key!r} is set for some slices only",
                              hint=f"Set {key} in every slice (or once in the top-level `parameters:`).")
        if not all(_numeric_setting(v) for v in everything):
            raise self.r.fail(self.node, f"Parameter {key!r} differs from slice to slice",
                              hint=f"hf-metagpt takes one {key} for the whole merge; give it once in the top-level `parameters:`.")
        return _layer_filters(values, pre, post)

    def _passthrough(self, globals_: dict[str, Any], nodes: dict[str, yaml.Node]):
        """Stacking as linear: weight 1 (or `scale`) where a model supplies the layer, else 0."""
        r = self.r
        for sl in self.slices:
            if len(sl.sources) != 1:
                raise r.fail(sl.node, "merge_method passthrough copies each layer from one model, "
                                      f"but this slice lists {len(sl.sources)}",
                             hint="Give each passthrough slice one source, or use a merge method (slerp, linear, ...) for this slice.")
        entries = []
        first, last = self.slices[0].sources[0].spec, self.slices[-1].sources[0].spec
        for spec in self.specs:
            def weight(sl: _Slice, x: float, spec: str = spec) -> Any:
                src = sl.sources[0]
                if src.spec != spec:
                    return 0.0
                scale = _chain(src.params.get("scale"), _chain(sl.params.get("scale"), globals_.get("scale")))
                return 1.0 if scale is None else _at(scale, x)

            values = [weight(sl, x) for sl, x in self.positions]
            pre = 1.0 if spec == first else 0.0
            post = 1.0 if spec == last else 0.0
            entries.append((spec, {"weight": _layer_filters(values, pre, post)}, nodes[spec]))
        return "linear", entries, {"normalize": False}


def _numeric_setting(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return _is_filter_list(v) and all(_numeric_setting(e["value"]) for e in v)


def _at(value: Any, x: float) -> Any:
    """A setting with its layer gradients evaluated at x (its place in a slice); filters kept."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        s = x * (len(value) - 1)
        i0 = int(s)
        i1 = min(len(value) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    if _is_filter_list(value):
        return [{**e, "value": _at(e["value"], x)} for e in value]
    return value


def _layer_filters(values: list[Any], pre: Any, post: Any) -> list[dict[str, Any]]:
    """`- filter: layers.j.` entries for output layers j, then embeddings (pre) and the rest (post)."""
    out = [{"filter": f"layers.{j}.", "value": v} for j, v in enumerate(values)]
    out.append({"filter": "embed", "value": pre})
    out.append({"value": post})
    return out


# --------------------------------------------------------------------------- our merge → mergekit YAML



def to_mergekit(method: str, params: dict[str, Any], base: str, models: list[str],
                out_dtype: str | None = None, adapters: list[bool] | None = None) -> str | None:
    """The mergekit recipe of a merge (`method.params()` and pinned references), or None when
    mergekit cannot express it (MetaGPT's λ, TIES's frequency sign election).

    `dtype`: the dtype the merge computed in with mergekit's arithmetic (none for the inputs' own),
    float32 for ours (where mergekit's results come closest to our float64 sums); `out_dtype` is what we wrote.
    """
    if method == "dare":
        method = "dare_linear"
    if method not in MERGEKIT_METHODS or method.startswith("metagpt"):
        return None
    if params.get("majority_sign_method", "total") != "total":
        return None
    refs = [f"{base}+{m}" if adapters and adapters[i] else m for i, m in enumerate(models)]
    entries: list[dict[str, Any]] = []
    top: dict[str, Any] = {}
    if method == "slerp":
        entries = [{"model": base}, {"model": refs[0]}]
        top = {"t": params.get("t", 0.5)}
    elif method in ("model_stock", "sce"):
        entries = [{"model": m} for m in refs]
        top = {k: v for k, v in params.items() if k in ("filter_wise", "select_topk")}
    else:
        weights = params.get("weights") or [1.0] * len(refs)
        per_model = params.get("per_model") or [{} for _ in refs]
        for ref, w, extra in zip(refs, weights, per_model):
            p = {"weight": 1.0 if w is None else w, **{k: v for k, v in extra.items() if v is not None}}
            entries.append({"model": ref, "parameters": p})
        for key in ("density", "gamma", "epsilon", "normalize", "rescale"):
            if key in params and key in MERGEKIT_METHODS[method] and params[key] is not None:
                top[key] = params[key]
        if "lambda_" in params and method != "linear":
            top["lambda"] = params["lambda_"]
        if method == "linear":
            top = {"normalize": params.get("normalize", True)}
    doc: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        doc["base_model"] = base
    doc["models"] = entries
    if top:
        doc["parameters"] = top
    order = params.get("mergekit_order")
    if order != "auto":  # "auto": mergekit computes in the inputs' dtype, as the merge did
        # float32 for our own arithmetic: where mergekit's results are closest to our float64 sums
        doc["dtype"] = order if isinstance(order, str) else "float32"
    if out_dtype:
        doc["out_dtype"] = ST_TO_CONFIG.get(out_dtype, out_dtype)
    return yaml.safe_dump(doc, sort_keys=False)
