"""TIES-Merging (Yadav et al., NeurIPS 2023) and its combination with MetaGPT.

Per tensor: trim each τt to its top-`density` magnitudes, elect a sign per parameter, keep the
entries that agree with it. `ties` then adds the disjoint mean of the kept entries (scaled by
λ·wt); `metagpt_ties` instead takes MetaGPT's λ from the norms of the kept task vectors
(METHOD.md, "Combination with DARE and TIES").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .base import MergeMethod, TensorContext
from .common import (
    LAMBDA_ALIASES,
    ParamsMixin,
    add_disjoint_mean_,
    check_density,
    check_real,
    check_sign_method,
    check_weights,
    keep_majority_sign_,
    per_model,
    trim_top_magnitude,
)
from .metagpt import MetaGPT

#: The TIES paper keeps the top 20% (k = 20) in its main experiments.
DEFAULT_TIES_DENSITY = 0.2


def ties_transform(taus: list[torch.Tensor], density: float, majority_sign_method: str = "total") -> list[torch.Tensor]:
    """Trim each task vector to its top-density magnitudes, elect signs, zero disagreeing entries.

    Returns new tensors; `taus` are left untouched. Deterministic (no randomness).
    """
    trimmed = [trim_top_magnitude(t, density).contiguous() for t in taus]
    return keep_majority_sign_(trimmed, majority_sign_method)


@dataclass
class Ties(ParamsMixin, MergeMethod):
    """TIES: trim to `density` (default 0.2), elect sign, disjoint mean; scaled by `lambda_`/`weights`.

    merged = θ0 + Σt λ wt τ̃t / #{t : τ̃t ≠ 0} per parameter (peft's `ties`; mergekit divides by
    the sum of the agreeing weights instead, which differs only when the weights differ).
    """

    name: ClassVar[str] = "ties"
    aliases: ClassVar = LAMBDA_ALIASES

    density: float = DEFAULT_TIES_DENSITY
    majority_sign_method: str = "total"
    weights: list[float] | None = None
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        self.density = check_density(self.name, self.density)
        self.majority_sign_method = check_sign_method(self.name, self.majority_sign_method)
        self.weights = check_weights(self.name, self.weights)
        self.lambda_ = check_real(self.name, "lambda_", self.lambda_)

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        return ties_transform(taus, self.density, self.majority_sign_method)

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        return per_model(self.name, self.weights, self.lambda_, n_models)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
        return add_disjoint_mean_(base, taus, coeffs)

    def params(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "majority_sign_method": self.majority_sign_method,
            "weights": self.weights,
            "lambda_": self.lambda_,
        }


@dataclass
class MetaGPTTies(ParamsMixin, MetaGPT):
    """TIES trim + sign election, then MetaGPT λ from the kept task vectors: θ0 + Σt λt τ̃t."""

    name: ClassVar[str] = "metagpt_ties"

    density: float = DEFAULT_TIES_DENSITY
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        self.density = check_density(self.name, self.density)
        self.majority_sign_method = check_sign_method(self.name, self.majority_sign_method)

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        return ties_transform(taus, self.density, self.majority_sign_method)

    def params(self) -> dict[str, Any]:
        return {"density": self.density, "majority_sign_method": self.majority_sign_method}
