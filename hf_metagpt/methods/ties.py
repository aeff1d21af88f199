"""TIES-Merging (Yadav et al., NeurIPS 2023) and its combination with MetaGPT.

Per tensor: trim each τt to its top-`density` magnitudes, elect a sign per parameter, keep the
entries that agree with it. `ties` (in `gta.py`, mergekit's semantics) then adds the weighted
mean of the kept entries; `metagpt_ties` instead takes MetaGPT's λ from the norms of the kept
task vectors (METHOD.md, "Combination with DARE and TIES").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import TensorContext
from .common import (
    ParamsMixin,
    check_density,
    check_sign_method,
    keep_majority_sign_,
    trim_top_magnitude,
)
from .gta import DEFAULT_TIES_DENSITY, Ties
from .metagpt import MetaGPT


def ties_transform(taus: list[torch.Tensor], density: float, majority_sign_method: str = "total") -> list[torch.Tensor]:
    """Trim each task vector to its top-density magnitudes, elect signs, zero disagreeing entries.

    Returns new tensors; `taus` are left untouched. Deterministic (no randomness).
    """
    trimmed = [trim_top_magnitude(t, density).contiguous() for t in taus]
    return keep_majority_sign_(trimmed, majority_sign_method)


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


__all__ = ["DEFAULT_TIES_DENSITY", "MetaGPTTies", "Ties", "ties_transform"]
