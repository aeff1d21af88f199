"""Task arithmetic (Ilharco et al., ICLR 2023): θ0 + λ Σt wt τt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .base import MergeMethod, weighted_sum
from .common import LAMBDA_ALIASES, ParamsMixin, check_real, check_weights, per_model


@dataclass
class TaskArithmetic(ParamsMixin, MergeMethod):
    """θ0 + λ Σt wt τt: `lambda_` (alias `lambda`, `scaling`; default 1) and optional per-model `weights`."""

    name: ClassVar[str] = "task_arithmetic"
    aliases: ClassVar = LAMBDA_ALIASES

    weights: list[float] | None = None
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        self.weights = check_weights(self.name, self.weights)
        self.lambda_ = check_real(self.name, "lambda_", self.lambda_)

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        return per_model(self.name, self.weights, self.lambda_, n_models)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
        return weighted_sum(base, taus, coeffs)

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights, "lambda_": self.lambda_}

    def model_weights(self, coeffs: Sequence[float]) -> tuple[float, list[float]]:
        # θ0 + Σ ct (θt − θ0) = (1 − Σ ct)·θ0 + Σ ct·θt
        return 1.0 - float(sum(coeffs)), [float(c) for c in coeffs]
