"""DARE (Yu et al., ICML 2024: drop and rescale) with MetaGPT (`dare_linear`/`dare_ties`: `gta.py`).

Each entry of each τt is dropped with probability p = 1 − density and the survivors are scaled by
1/density (the paper's rescale), so E[τ̃t] = τt. (`dare_linear`/`dare_ties` follow mergekit and
rescale to keep ‖τt‖₁ per tensor instead.) The mask is drawn from `TensorContext.generator(model_index)`: the same
seed and tensor name give the same mask in every pass and process; another tensor gets another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import TensorContext
from .common import (
    ParamsMixin,
    check_density,
    dare_drop,
    density_from_drop_rate,
)
from .gta import DEFAULT_DARE_DENSITY, DareLinear, DareTies
from .metagpt import MetaGPT

#: `density` is canonical (peft, mergekit); `drop_rate` (p) is accepted and stored as 1 − p.
DROP_ALIASES = {"drop_rate": ("density", density_from_drop_rate)}


def dare_transform(taus: list[torch.Tensor], density: float, ctx: TensorContext) -> list[torch.Tensor]:
    """Drop and rescale each task vector with its own seeded mask (density 1: unchanged, no draw)."""
    return [dare_drop(t, density, ctx.generator(i, t.device)) for i, t in enumerate(taus)]


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


__all__ = ["DEFAULT_DARE_DENSITY", "DareLinear", "DareTies", "MetaGPTDare", "dare_transform"]
