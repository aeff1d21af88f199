"""Per-tensor parameter values: layer gradients and name filters (mergekit's parameter syntax).

A *setting* is what a method parameter may be given as, besides a plain number:

- a list of numbers, a gradient across the layers: the value of layer i of n is the list
  interpolated linearly at x = i / (n − 1) (x = 1 for a single layer; x = 0 for tensors outside
  the layers: embeddings, final norm, head), as mergekit does for `t: [0, 0.5, 1]`;
- a list of `{filter: TEXT, value: SETTING}` entries: the first entry whose filter is a substring
  of the tensor's name (or is absent or `*`) gives the value; no match gives "not set", and the
  next place the parameter is set (per-model → method-wide → default) decides.

Settings are checked when the method is built and resolved per tensor from its `TensorContext`;
with no context (the plain parameters) the tensor is taken to be outside the layers with an empty
name, so filtered settings fall through to the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import MergeError
from .base import TensorContext

#: Marks "no value for this tensor" (a filter list that matched nothing).
UNSET = object()


@dataclass(frozen=True)
class Gradient:
    """Values interpolated across the layers."""

    values: tuple[float, ...]


@dataclass(frozen=True)
class Filtered:
    """(filter or None, setting) entries; the first that matches the tensor name wins."""

    entries: tuple[tuple[str | None, Any], ...]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_setting(method: str, name: str, value: Any, check: Callable[[str, Any], Any]) -> Any:
    """A checked setting: `check(method, scalar)` for a scalar, a Gradient or a Filtered."""
    if isinstance(value, (Gradient, Filtered)):
        return value
    if isinstance(value, Mapping) and set(value) <= {"filter", "value"} and "value" in value:
        value = [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeError(f"Method {method!r}: {name} is an empty list.",
                             hint="Give a number, a list of numbers (one per layer span), "
                                  "or a list of {filter: ..., value: ...} entries.")
        if all(_is_number(v) for v in value):
            return Gradient(tuple(float(check(method, v)) for v in value))
        if all(isinstance(v, Mapping) for v in value):
            entries = []
            for e in value:
                unknown = set(e) - {"filter", "value"}
                if unknown or "value" not in e:
                    raise MergeError(
                        f"Method {method!r}: a filtered value of {name} must have the keys "
                        f"'filter' and 'value', got {sorted(map(str, e))}.",
                        hint="Write e.g. `- filter: self_attn` followed by `  value: 0.5`.")
                flt = e.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise MergeError(f"Method {method!r}: filter of {name} must be text, got {flt!r}.")
                entries.append((None if flt in (None, "*") else flt, parse_setting(method, name, e["value"], check)))
            return Filtered(tuple(entries))
        raise MergeError(
            f"Method {method!r}: {name} mixes numbers and other values: {value!r}.",
            hint="A list is either numbers (a gradient across the layers) or {filter, value} entries.")
    return check(method, value)


def gradient_position(ctx: TensorContext | None) -> float:
    """Where a tensor sits on a layer gradient: i / (n − 1) in layer i of n, 1 for one layer, 0 outside."""
    if ctx is None or ctx.layer is None or not ctx.n_layers:
        return 0.0
    if ctx.n_layers <= 1:
        return 1.0
    return ctx.layer / (ctx.n_layers - 1)


def resolve(setting: Any, ctx: TensorContext | None) -> Any:
    """The value of a setting for one tensor (UNSET when a filter list matches nothing)."""
    if isinstance(setting, Gradient):
        vals = setting.values
        x = gradient_position(ctx) * (len(vals) - 1)
        i0 = int(x)
        i1 = min(len(vals) - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]
    if isinstance(setting, Filtered):
        name = ctx.name if ctx is not None else ""
        for flt, value in setting.entries:
            if flt is None or (name and flt in name):
                return resolve(value, ctx)
        return UNSET
    return setting


def first_set(ctx: TensorContext | None, *settings: Any, default: Any = None) -> Any:
    """The first setting (in precedence order; None = not given) that has a value for this tensor."""
    for s in settings:
        if s is None:
            continue
        v = resolve(s, ctx)
        if v is not UNSET:
            return v
    return default


def describe(setting: Any) -> Any:
    """A setting as plain data (for the coefficients file, the card and a rerun's recipe)."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, Filtered):
        return [{"value": describe(v)} if f is None else {"filter": f, "value": describe(v)}
                for f, v in setting.entries]
    return setting


def per_model_list(method: str, name: str, value: Any, check: Callable[[str, Any], Any]) -> list[Any] | None:
    """A list with one setting per fine-tune (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise MergeError(f"Method {method!r}: {name} must be a list, one entry per fine-tune, got {value!r}.")
    return [None if v is None else parse_setting(method, name, v, check) for v in value]
