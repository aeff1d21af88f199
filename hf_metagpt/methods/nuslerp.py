"""NuSLERP (mergekit's `nuslerp`): spherical interpolation of two models by relative weights.

With weights w1, w2 of the two models, t = w2 / (w1 + w2), and v1, v2 either the models' task
vectors τt = θt − θ0 (with a base model; the merge is θ0 + result) or the models themselves
(`task_vectors: false`, a recipe without `base_model`):

    cos Ω = ⟨v1/max(‖v1‖, ε), v2/max(‖v2‖, ε)⟩ clamped to [−1, 1],   ε = 1e-8
    result = (sin((1−t)Ω)·v1 + sin(tΩ)·v2) / sin Ω,   or (1−t)·v1 + t·v2 when 1 − |cos Ω| < ε

taken over the whole tensor (`nuslerp_flatten`, default), or per vector of the last dimension
(`nuslerp_flatten: false`), or of the first (`nuslerp_row_wise: true` as well); 1-D tensors are
one vector. Order and dtype of every step are mergekit 0.1.5's (checked bit for bit against its
outputs, `tests/methods/test_nuslerp.py`): with `mergekit_order` the inputs come in the recipe's dtype,
otherwise in float32. The norms and dot products are taken on CPU copies, so a GPU gives the same
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext
from .common import ParamsMixin, check_real
from .mergekit_order import parse_order
from .settings import describe, first_set, per_model_list
from .sparsify import host

EPS = 1e-8


def _bool(method: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MergeError(f"Method {method!r}: {name} must be true or false, got {value!r}.")
    return value


def nuslerp(t: float, v1: torch.Tensor, v2: torch.Tensor, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """The formula of the module docstring, in the inputs' dtype."""
    shape = v1.shape
    if flatten or v1.dim() < 2:
        a, b, dim = v1.reshape(-1), v2.reshape(-1), -1
    else:
        a, b, dim = v1, v2, (0 if row_wise else -1)
    ha, hb = host(a), host(b)
    na = torch.linalg.vector_norm(ha, dim=dim, keepdim=True).clamp(min=EPS)
    nb = torch.linalg.vector_norm(hb, dim=dim, keepdim=True).clamp(min=EPS)
    dot = ((ha / na) * (hb / nb)).sum(dim=dim, keepdim=True).clamp(-1, 1)
    del ha, hb
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    ca, cb = torch.sin((1 - t) * omega), torch.sin(t * omega)
    linear = ((1 - dot.abs()) < EPS).to(a.device)
    ca, cb, sin_omega, dot = (x.to(a.device) for x in (ca, cb, sin_omega, dot))
    out = torch.where(linear, (1 - t) * a + t * b, (ca * a + cb * b) / sin_omega)
    return out.reshape(shape)


@dataclass
class NuSlerp(ParamsMixin, MergeMethod):
    """NuSLERP of two models (or of their task vectors) by relative weights; see the module docstring."""

    name: ClassVar[str] = "nuslerp"

    weights: list[Any] | None = None
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False
    #: true: interpolate the task vectors and add the base (a recipe with base_model); false: the models
    task_vectors: bool = True
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.weights = per_model_list(self.name, "weights", self.weights, lambda m, v: check_real(m, "weights", v))
        for flag in ("nuslerp_flatten", "nuslerp_row_wise", "task_vectors"):
            _bool(self.name, flag, getattr(self, flag))
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def tensor_t(self, n_models: int, ctx: TensorContext | None = None) -> float:
        if n_models != 2:
            raise MergeError(f"Method 'nuslerp' merges exactly two models; got {n_models}.",
                             hint="List two models (and, optionally, a base_model whose task vectors they give).")
        w = [1.0, 1.0] if self.weights is None else [float(first_set(ctx, x, default=1.0)) for x in self.weights]
        if len(w) != 2:
            raise MergeError(f"Method 'nuslerp': {len(w)} weights given for 2 models.")
        if w[0] + w[1] == 0:
            raise MergeError("Method 'nuslerp': the two weights sum to 0, so they give no interpolation factor.",
                             hint="Use weights with a nonzero sum.")
        return w[1] / (w[0] + w[1])

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        t = self.tensor_t(n_models)
        return [1 - t, t]

    def interpolate(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext | None) -> torch.Tensor:
        """From the models θ1, θ2 (and θ0), in their dtype."""
        t = self.tensor_t(len(models), ctx)
        if not self.task_vectors:
            return nuslerp(t, models[0], models[1], self.nuslerp_flatten, self.nuslerp_row_wise)
        taus = [m - base for m in models]
        return base + nuslerp(t, taus[0], taus[1], self.nuslerp_flatten, self.nuslerp_row_wise)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        if self.task_vectors:
            t = self.tensor_t(len(taus), ctx)
            return base + nuslerp(t, taus[0], taus[1], self.nuslerp_flatten, self.nuslerp_row_wise)
        return self.interpolate(base, [base + tau for tau in taus], ctx)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": None if self.weights is None else [describe(w) for w in self.weights],
                               "nuslerp_flatten": self.nuslerp_flatten, "nuslerp_row_wise": self.nuslerp_row_wise,
                               "task_vectors": self.task_vectors}
        if self.mergekit_order:
            out["mergekit_order"] = self.mergekit_order
        return out

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return self.interpolate(base, models, ctx)


__all__ = ["NuSlerp", "nuslerp"]
