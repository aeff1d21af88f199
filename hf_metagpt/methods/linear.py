"""Linear merge (model soup, Wortsman et al., ICML 2022): Σt wt θt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, weighted_sum
from .common import ParamsMixin, check_weights, per_model


@dataclass
class Linear(ParamsMixin, MergeMethod):
    """Weighted average of the fine-tunes: `weights` (default equal), `normalize` (default True).

    Written with task vectors, Σt wt θt = θ0 + Σt wt τt when the weights sum to 1 (normalize).
    Without normalize it stays Σt wt θt, i.e. θ0 is scaled by Σt wt as well (mergekit's meaning),
    not task arithmetic.
    """

    name: ClassVar[str] = "linear"

    weights: list[float] | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        self.weights = check_weights(self.name, self.weights)
        if not isinstance(self.normalize, bool):
            raise MergeError(f"Method 'linear': normalize must be true or false, got {self.normalize!r}.")

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        w = per_model(self.name, self.weights, 1.0, n_models)
        if not self.normalize:
            return w
        total = sum(w)
        if total == 0.0:
            raise MergeError(
                "Method 'linear': the weights sum to 0, so they cannot be normalized.",
                hint="Use weights with a nonzero sum, or normalize: false.",
            )
        return [x / total for x in w]

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
        if not self.normalize:
            # Σ wt θt = (Σ wt) θ0 + Σ wt τt.
            base = base.mul_(float(sum(coeffs)))
        return weighted_sum(base, taus, coeffs)

    def model_weights(self, coeffs: Sequence[float]) -> tuple[float, list[float]]:
        # Normalized: θ0 + Σ wt τt with Σ wt = 1; unnormalized: Σ wt θt. Either way the base
        # weight is what is left of 1 (0 up to rounding) or exactly 0.
        w = [float(c) for c in coeffs]
        return (1.0 - sum(w) if self.normalize else 0.0), w

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights, "normalize": self.normalize}
