"""Linear merge (model soup, Wortsman et al., ICML 2022): Σt wt θt (÷ Σt wt with normalize)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext, weighted_sum
from .common import ParamsMixin, check_real
from . import mergekit_order
from .mergekit_order import parse_order
from .settings import describe, first_set, per_model_list


@dataclass
class Linear(ParamsMixin, MergeMethod):
    """Weighted average of the fine-tunes: `weights` (default equal), `normalize` (default True).

    Written with task vectors, Σt wt θt = θ0 + Σt wt τt when the weights sum to 1 (normalize).
    Without normalize it stays Σt wt θt, i.e. θ0 is scaled by Σt wt as well (mergekit's meaning),
    not task arithmetic. Weights may be per-tensor settings (layer gradients, name filters).
    """

    name: ClassVar[str] = "linear"

    weights: list[Any] | None = None
    normalize: bool = True
    #: compute as mergekit does (`mergekit_order.py`: float32 steps in its order, whatever its dtype)
    #: instead of our float64 accumulation: False, "auto" or a dtype name (set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.weights = per_model_list(self.name, "weights", self.weights, lambda m, v: check_real(m, "weights", v))
        if not isinstance(self.normalize, bool):
            raise MergeError(f"Method 'linear': normalize must be true or false, got {self.normalize!r}.")
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def tensor_coefficients(self, n_models: int, ctx: TensorContext | None = None) -> list[float]:
        """wt (÷ Σ wt with normalize) of this tensor."""
        if self.weights is None:
            w = [1.0] * n_models
        else:
            if len(self.weights) != n_models:
                raise MergeError(
                    f"Method {self.name!r}: {len(self.weights)} weights given for {n_models} fine-tunes.",
                    hint="Give one weight per fine-tune, in the order the fine-tunes are listed.")
            w = [float(first_set(ctx, x, default=1.0)) for x in self.weights]
        if not self.normalize:
            return w
        total = sum(w)
        if total == 0.0:
            where = f" for tensor {ctx.name!r}" if ctx is not None else ""
            raise MergeError(
                f"Method 'linear': the weights sum to 0{where}, so they cannot be normalized.",
                hint="Use weights with a nonzero sum, or normalize: false.",
            )
        return [x / total for x in w]

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        return self.tensor_coefficients(n_models)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        if ctx is not None:
            coeffs = self.tensor_coefficients(len(taus), ctx)
        if not self.normalize:
            # Σ wt θt = (Σ wt) θ0 + Σ wt τt.
            base = base.mul_(float(sum(coeffs)))
        return weighted_sum(base, taus, coeffs)

    def model_weights(self, coeffs: Sequence[float], ctx: TensorContext | None = None) -> tuple[float, list[float]] | None:
        if self.mergekit_order:
            return None  # the method path: mergekit's float32 steps (`mergekit_order.linear`)
        # Σ wt θt either way (normalized weights sum to 1): the base weighs exactly 0, not the
        # rounding residue of 1 − Σ wt, which would leak θ0 into parameters that cancel to 0.
        w = self.tensor_coefficients(len(coeffs), ctx) if ctx is not None else [float(c) for c in coeffs]
        return 0.0, w

    def params(self) -> dict[str, Any]:
        out = {"weights": None if self.weights is None else [describe(w) for w in self.weights],
               "normalize": self.normalize}
        if self.mergekit_order:
            out["mergekit_order"] = self.mergekit_order
        return out

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return mergekit_order.linear(self, models, ctx)
