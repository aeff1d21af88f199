"""Interpolating methods that take their coefficients from each tensor: SLERP, Model Stock, SCE.

Their coefficients depend on the tensor itself (an angle, a cosine, a mean square), so they are
computed in `combine`, per tensor, in float32, in the order mergekit 0.1.5 computes them (its
documented behaviour and its outputs, measured by `bench/mergekit_agreement.py`; no code of it).
`coefficients` only records the plain per-model shares for the card.

Those coefficients (sums, norms, acos/sin, the variance top-k) are computed from CPU copies
whatever the device (`sparsify.host`), on one thread (`sparsify.single_threaded`): a GPU, or a
CPU with more threads, sums in another order and a GPU's transcendental functions round
otherwise, so the coefficients, and then the output bytes, would depend on the machine. The
elementwise arithmetic that applies them is IEEE-exact on both and runs where the tensors are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext
from .common import ParamsMixin, check_real
from .mergekit_order import model_sum, parse_order
from .settings import describe, first_set, parse_setting
from .sparsify import div_exact, host, single_threaded

#: SLERP falls back to linear interpolation when the normalised tensors are this close to parallel.
DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def _fraction(name: str, lo: float = 0.0, hi: float = 1.0):
    def check(method: str, value: Any) -> float:
        v = check_real(method, name, value)
        if not lo <= v <= hi:
            raise MergeError(f"Method {method!r}: {name} must be in [{lo:g}, {hi:g}], got {value!r}.")
        return v
    return check


def _with_order(method: Any, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the method's `mergekit_order` when it is set (so a rerun computes the same way)."""
    if method.mergekit_order:
        params["mergekit_order"] = method.mergekit_order
    return params


def _need(method: str, n_models: int, low: int, high: int | None, what: str) -> None:
    if n_models < low or (high is not None and n_models > high):
        raise MergeError(f"Method {method!r} merges {what}; got {n_models} fine-tune(s).",
                         hint="List the fine-tunes after --base (in a mergekit recipe: the models other than base_model).")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (float32); linear when they are near-parallel.

    cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩ (norms under 1e-8 taken as 1), and
    slerp = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1; |cos Ω| > 0.9995 gives (1−t)·v0 + t·v1.
    """
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    ha, hb = host(a), host(b)
    with single_threaded():
        na = torch.linalg.vector_norm(ha)
        nb = torch.linalg.vector_norm(hb)
        na = torch.where(na > _NORM_EPS, na, torch.ones_like(na))
        nb = torch.where(nb > _NORM_EPS, nb, torch.ones_like(nb))
        dot = ((ha / na) * (hb / nb)).sum().clamp(-1, 1)
    del ha, hb
    tt = torch.tensor(t, dtype=torch.float32)
    if float(dot.abs()) > DOT_THRESHOLD:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    return (ca.to(a.device) * a + cb.to(a.device) * b).reshape(v0.shape)


@dataclass
class Slerp(ParamsMixin, MergeMethod):
    """SLERP between the base (t = 0) and one fine-tune (t = 1); `t` may vary by layer and filter."""

    name: ClassVar[str] = "slerp"

    t: Any = 0.5
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.t = parse_setting(self.name, "t", self.t, _fraction("t"))
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def tensor_t(self, ctx: TensorContext | None = None) -> float:
        value = first_set(ctx, self.t)
        if value is None:
            raise MergeError(f"Method 'slerp': no value of t applies to tensor {ctx.name if ctx else '?'!r}.",
                             hint="End the filter list of t with an entry without a filter (the default).")
        return float(value)

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        _need(self.name, n_models, 1, 1, "the base with exactly one other model")
        return [float(first_set(None, self.t, default=0.0))]

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        (tau,) = taus
        return slerp(self.tensor_t(ctx), base, base + tau)

    def params(self) -> dict[str, Any]:
        return _with_order(self, {"t": describe(self.t)})

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        (other,) = models  # SLERP of the inputs (rounded to the recipe's dtype) in float32
        return slerp(self.tensor_t(ctx), base.float(), other.float())


@dataclass
class ModelStock(ParamsMixin, MergeMethod):
    """Model Stock (Jang et al., ECCV 2024): t·mean(θt) + (1 − t)·θ0, t = N cos / (1 + (N − 1) cos).

    cos is the mean pairwise cosine between the task vectors, of the whole tensor or, with
    `filter_wise`, of each row; a denominator under 1e-6 keeps the base.
    """

    name: ClassVar[str] = "model_stock"

    filter_wise: bool = False
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        if not isinstance(self.filter_wise, bool):
            raise MergeError(f"Method 'model_stock': filter_wise must be true or false, got {self.filter_wise!r}.")
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        _need(self.name, n_models, 2, None, "the base with two or more fine-tunes")
        return [1.0 / n_models] * n_models

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        _need(self.name, len(taus), 2, None, "the base with two or more fine-tunes")
        shape = base.shape
        w0 = self._rows(base)
        offs = [self._rows(t) for t in taus]
        cos = _mean_cosine([host(o) for o in offs])
        n = len(offs)
        den = 1 + (n - 1) * cos
        singular = den.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))
        t = t.to(w0.device)
        average = _mean([w0 + o for o in offs])
        return (t * average + (1 - t) * w0).reshape(shape)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor as its cosines are taken: by rows with `filter_wise` (a vector is one row), else whole."""
        if self.filter_wise:
            return t.unsqueeze(0) if t.dim() == 1 else t
        return t.reshape(-1)

    def params(self) -> dict[str, Any]:
        return _with_order(self, {"filter_wise": self.filter_wise})

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        """Model Stock step by step in the inputs' dtype (`mergekit_order.py`; cosines from CPU copies)."""
        _need("model_stock", len(models), 2, None, "the base with two or more fine-tunes")
        shape = base.shape
        w0 = self._rows(base)
        ws = [self._rows(t) for t in models]
        cos = _mean_cosine([host(w - w0) for w in ws])
        n = len(ws)
        t = ((n * cos) / (1 + (n - 1) * cos)).to(w0.device)
        return (t * _mean(ws) + (1 - t) * w0).reshape(shape)


def _mean_cosine(offs: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock's cos: the mean pairwise cosine of the task vectors (per row), with a trailing axis."""
    cosines = []
    with single_threaded():
        for i, a in enumerate(offs):
            for b in offs[i + 1:]:
                norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def _mean(models: list[torch.Tensor]) -> torch.Tensor:
    """((θ1 + θ2) + ...) / N, each step in the models' dtype."""
    total = models[0]
    for m in models[1:]:
        total = total + m
    return div_exact(total, len(models))


def sce_select_mask(taus: list[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """SCE "select": keep the ⌊select_topk · #{var ≠ 0}⌋ parameters of largest variance across models."""
    if select_topk >= 1:
        return None
    stacked = torch.stack([host(t) for t in taus])
    var = torch.var(stacked, dim=0, unbiased=False)
    del stacked
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros_like(var)
    if k > 0:
        idx = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices
        mask.view(-1)[idx] = 1
    return mask.to(taus[0].device)


def sce_weights(taus: list[torch.Tensor]) -> torch.Tensor:
    """SCE "calculate": mean(τt²) per model as shares of their sum (uniform when the sum is < 1e-6)."""
    with single_threaded():
        w = torch.stack([host(t).square().reshape(-1).mean() for t in taus])
    total = float(torch.sum(w))
    if abs(total) < 1e-6:
        w = torch.ones_like(w) / w.shape[0]
    else:
        w = w / total
    return w.to(taus[0].device)


@dataclass
class SCE(ParamsMixin, MergeMethod):
    """SCE (Wan et al., FuseChat 2024): select by variance, MetaGPT-like per-tensor shares, erase by sign.

    merged = θ0 + Σt wt mt τt / max(Σt wt mt, 1e-6), with wt = mean(τt²)/Σk mean(τk²) of the selected
    task vectors (the MetaGPT share, per tensor) and mt the agreement with the sign of Σt τt.
    """

    name: ClassVar[str] = "sce"

    select_topk: Any = 1.0
    int8_mask: bool = False  # mergekit's mask storage switch: no effect on the values
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.select_topk = parse_setting(self.name, "select_topk", self.select_topk, _fraction("select_topk"))
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        return [1.0 / n_models] * n_models

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        topk = float(first_set(ctx, self.select_topk, default=1.0))
        mask = sce_select_mask(taus, topk)
        if mask is not None:
            taus = [t * mask for t in taus]
        total = None
        for t in taus:
            total = t.clone() if total is None else total.add_(t)
        assert total is not None
        elected = (total >= 0).to(torch.float32).mul_(2).sub_(1)
        del total
        w = sce_weights(taus)
        merged = None
        weight_sum = None
        for wt, t in zip(w, taus):
            erased = (t.sign() == elected).to(torch.float32).mul_(wt)
            term = t * erased
            merged = term if merged is None else merged.add_(term)
            weight_sum = erased if weight_sum is None else weight_sum.add_(erased)
        assert merged is not None and weight_sum is not None
        return base.add_(merged.div_(weight_sum.clamp_(min=1e-6)))

    def params(self) -> dict[str, Any]:
        return _with_order(self, {"select_topk": describe(self.select_topk)})

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        """SCE step by step in the inputs' dtype (`mergekit_order.py`)."""
        taus = [t - base for t in models]
        mask = sce_select_mask(taus, float(first_set(ctx, self.select_topk, default=1.0)))
        if mask is not None:
            taus = [t * mask for t in taus]
        with single_threaded():
            shares = torch.stack([host(t).square().reshape(-1).mean() for t in taus])
        total = torch.sum(shares).item()
        shares = torch.ones_like(shares) / shares.shape[0] if abs(total) < 1e-6 else shares / total
        w = list(shares.to(base.device).unbind())
        signs = [t.sign() for t in taus]
        elected = (model_sum(taus) >= 0).to(base.dtype) * 2 - 1
        erased = [wt * (s == elected) for wt, s in zip(w, signs)]
        merged = model_sum([t * e for t, e in zip(taus, erased)])
        return base + merged / model_sum(erased).clamp(min=1e-6)


__all__ = ["SCE", "ModelStock", "Slerp", "slerp", "sce_select_mask", "sce_weights"]
