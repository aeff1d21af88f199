"""DARE (Yu et al., ICML 2024: drop and rescale) with task arithmetic, TIES, or MetaGPT.

Each entry of each τt is dropped with probability p = 1 − density and the survivors are scaled by
1/density, so E[τ̃t] = τt. The mask is drawn from `TensorContext.generator(model_index)`: the same
seed and tensor name give the same mask in every pass and process; another tensor gets another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .base import MergeMethod, TensorContext, weighted_sum
from .common import (
    LAMBDA_ALIASES,
    ParamsMixin,
    check_density,
    check_real,
    check_weights,
    dare_drop,
    density_from_drop_rate,
    keep_majority_sign_,
    per_model,
)
from .metagpt import MetaGPT
from .ties import Ties

#: Keep half of each task vector (p = 0.5); the DARE paper shows SFT deltas survive far higher p.
DEFAULT_DARE_DENSITY = 0.5

#: `density` is canonical (peft, mergekit); `drop_rate` (p) is accepted and stored as 1 − p.
DROP_ALIASES = {"drop_rate": ("density", density_from_drop_rate)}


def dare_transform(taus: list[torch.Tensor], density: float, ctx: TensorContext) -> list[torch.Tensor]:
    """Drop and rescale each task vector with its own seeded mask (density 1: unchanged, no draw)."""
    return [dare_drop(t, density, ctx.generator(i, t.device)) for i, t in enumerate(taus)]


def dare_ties_transform(
    taus: list[torch.Tensor], density: float, ctx: TensorContext, majority_sign_method: str = "total"
) -> list[torch.Tensor]:
    """DARE drop and rescale, then TIES sign election on the survivors (peft's `dare_ties` order)."""
    dropped = dare_transform(taus, density, ctx)
    owned = [d.clone() if d is t else d.contiguous() for d, t in zip(dropped, taus)]
    return keep_majority_sign_(owned, majority_sign_method)


@dataclass
class DareLinear(ParamsMixin, MergeMethod):
    """DARE then task arithmetic: θ0 + λ Σt wt τ̃t; `density` (default 0.5) or `drop_rate`."""

    name: ClassVar[str] = "dare_linear"
    uses_seed: ClassVar[bool] = True
    aliases: ClassVar = {**LAMBDA_ALIASES, **DROP_ALIASES}

    density: float = DEFAULT_DARE_DENSITY
    weights: list[float] | None = None
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        self.density = check_density(self.name, self.density)
        self.weights = check_weights(self.name, self.weights)
        self.lambda_ = check_real(self.name, "lambda_", self.lambda_)

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        return dare_transform(taus, self.density, ctx)

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        return per_model(self.name, self.weights, self.lambda_, n_models)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
        return weighted_sum(base, taus, coeffs)

    def params(self) -> dict[str, Any]:
        return {"density": self.density, "weights": self.weights, "lambda_": self.lambda_}


@dataclass
class DareTies(Ties):
    """DARE then TIES sign election and disjoint mean (no magnitude trim), scaled by `lambda_`/`weights`.

    Everything but the transform (and the default density) is TIES's.
    """

    name: ClassVar[str] = "dare_ties"
    uses_seed: ClassVar[bool] = True
    aliases: ClassVar = {**LAMBDA_ALIASES, **DROP_ALIASES}

    density: float = DEFAULT_DARE_DENSITY

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        return dare_ties_transform(taus, self.density, ctx, self.majority_sign_method)


@dataclass
class MetaGPTDare(ParamsMixin, MetaGPT):
    """DARE drop and rescale, then MetaGPT λ from the dropped task vectors: θ0 + Σt λt τ̃t."""

    name: ClassVar[str] = "metagpt_dare"
    uses_seed: ClassVar[bool] = True
    aliases: ClassVar = DROP_ALIASES

    density: float = DEFAULT_DARE_DENSITY

    def __post_init__(self) -> None:
        self.density = check_density(self.name, self.density)

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        return dare_transform(taus, self.density, ctx)

    def params(self) -> dict[str, Any]:
        return {"density": self.density}
