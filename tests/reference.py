"""An independent MetaGPT: whole state dicts in float64, plain torch, no hf_metagpt code.

Written from docs/method.md alone so the engine's streaming, grouping and precision choices are
checked against the formula, not against themselves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def group_of(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        m = re.search(r"\.layers\.(\d+)\.", name)
        return f"layers.{m.group(1)}" if m else name
    return name


def reference_metagpt(base: dict, fts: list[dict], granularity: str):
    """Expected merged tensors (float64, before rounding) and λ per group, float64 throughout."""
    sq: dict[str, list[float]] = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        g = group_of(name, granularity)
        acc = sq.setdefault(g, [0.0] * len(fts))
        for i, ft in enumerate(fts):
            tau = ft[name].double() - b.double()
            acc[i] += float((tau * tau).sum())
    lambdas = {g: ([v / sum(vals) for v in vals] if sum(vals) > 0 else [0.0] * len(vals)) for g, vals in sq.items()}
    merged = {}
    for name, b in base.items():
        if not b.is_floating_point():
            merged[name] = b.clone()
            continue
        lam = lambdas[group_of(name, granularity)]
        acc = b.double().clone()
        for i, ft in enumerate(fts):
            acc += lam[i] * (ft[name].double() - b.double())
        merged[name] = acc
    return merged, lambdas


def assert_within_ulp(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0,
                      scale: torch.Tensor | None = None) -> None:
    """|actual − expected| ≤ ulps · ulp(expected) in `dtype` (expected given in float64).

    With `scale`, the ulp is taken of |scale| instead: float32 arithmetic on inputs of that size
    cannot be more exact than their ulp, whatever the size of the result.
    """
    assert actual.dtype == dtype, (actual.dtype, dtype)
    a = actual.double()
    e = expected64.double()
    ref = e if scale is None else torch.maximum(scale.double().abs(), e.abs())
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}[dtype]
    ulp = torch.where(ref == 0, torch.full_like(e, tiny), 2.0 ** (torch.floor(torch.log2(ref.abs())) - mant))
    bad = (a - e).abs() > ulps * ulp + tiny
    assert not bool(bad.any()), f"{int(bad.sum())} element(s) off by more than {ulps} ulp; max diff {(a - e).abs().max()}"
