"""MetaGPT: model-exclusive task arithmetic (Zhou et al., EMNLP 2024, arXiv 2406.11385).

λt = ‖τt‖² / Σk ‖τk‖², merged = θ0 + Σt λt τt. The norms are taken over a group (the whole
model in the paper; a block or a tensor in our extension); the engine reduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import MergeMethod, TensorContext, weighted_sum


def metagpt_lambdas(sq_norms: Sequence[float]) -> list[float]:
    """λt = ‖τt‖² / Σk ‖τk‖²; all zeros when every task vector of the group is zero (never NaN)."""
    total = float(sum(sq_norms))
    if total == 0.0:
        return [0.0 for _ in sq_norms]
    return [float(n) / total for n in sq_norms]


def metagpt_merge(base: torch.Tensor, taus: list[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """θ0 + Σt λt τt (float32, in place into `base`)."""
    return weighted_sum(base, taus, lambdas)


@dataclass
class MetaGPT(MergeMethod):
    """MetaGPT, the default: the paper's closed-form λ from squared task-vector norms (no parameters)."""

    name = "metagpt"
    uses_group_norms = True

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        assert sq_norms is not None
        return metagpt_lambdas(sq_norms)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        return metagpt_merge(base, taus, coeffs)

    def model_weights(self, coeffs: Sequence[float], ctx: TensorContext | None = None) -> tuple[float, list[float]]:
        # θ0 + Σ ct (θt − θ0) = (1 − Σ ct)·θ0 + Σ ct·θt
        return 1.0 - float(sum(coeffs)), [float(c) for c in coeffs]
