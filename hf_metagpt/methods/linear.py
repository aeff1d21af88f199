"""Linear merge (model soup, Wortsman et al., ICML 2022): Σt wt θt (÷ Σt wt with normalize)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext, weighted_sum
from .common import ParamsMixin, check_real
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
    #: compute as mergekit does with `dtype: float32` — Σ wt·θt summed in float32 over the stacked
    #: models, then ÷ Σ wt — instead of our float64 accumulation (set by mergekit recipes; see gta.py)
    mergekit_order: bool = False

    def __post_init__(self) -> None:
        self.weights = per_model_list(self.name, "weights", self.weights, lambda m, v: check_real(m, "weights", v))
        for flag in ("normalize", "mergekit_order"):
            if not isinstance(getattr(self, flag), bool):
                raise MergeError(f"Method 'linear': {flag} must be true or false, got {getattr(self, flag)!r}.")

    @property
    def wants_models(self) -> bool:
        """The engine hands `combine_models` the fine-tunes themselves (θt in float32, not τt)."""
        return self.mergekit_order

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

    def combine_models(self, models: list[torch.Tensor], ctx: TensorContext | None = None) -> torch.Tensor:
        """mergekit's float32 steps: w1·θ1, then each + wt·θt as one fused multiply-add, then ÷ Σ wt.

        This order was measured against mergekit 0.1.5 (`dtype: float32`): it reproduced all 164,416
        elements of bench/mergekit_agreement.py's linear merge bit for bit, where a stacked sum, a
        plain sequential sum or any other order of the terms differed in 1–2 % of the elements.
        """
        w = [float(first_set(ctx, x, default=1.0)) for x in self.weights] if self.weights is not None \
            else [1.0] * len(models)
        res = models[0] * w[0]
        for t, x in zip(models[1:], w[1:]):
            res = res.add(t, alpha=x)
        if self.normalize:
            res = res / torch.tensor(w, dtype=res.dtype).sum()
        return res

    def model_weights(self, coeffs: Sequence[float], ctx: TensorContext | None = None) -> tuple[float, list[float]] | None:
        if self.mergekit_order:
            return None  # the method path: `combine_models`, step by step in float32
        # Σ wt θt either way (normalized weights sum to 1): the base weighs exactly 0, not the
        # rounding residue of 1 − Σ wt, which would leak θ0 into parameters that cancel to 0.
        w = self.tensor_coefficients(len(coeffs), ctx) if ctx is not None else [float(c) for c in coeffs]
        return 0.0, w

    def params(self) -> dict[str, Any]:
        out = {"weights": None if self.weights is None else [describe(w) for w in self.weights],
               "normalize": self.normalize}
        if self.mergekit_order:
            out["mergekit_order"] = True
        return out
