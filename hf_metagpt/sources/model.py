"""`ModelInfo`: what is known of one input before any weight is read (its config and tensor headers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..safetensors_io import TensorMeta
from .refs import ModelRef


@dataclass
class ModelInfo:
    """What the plan knows of one input model: its config and its tensors' headers."""

    ref: ModelRef
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    weight_files: list[str]

    @property
    def name(self) -> str:
        return self.ref.display

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of this model's version of base tensor `name` (adapters answer for the base's names)."""
        return self.tensors[name].shape

    @property
    def vocab_rows(self) -> int | None:
        for name, meta in self.tensors.items():
            if name.endswith("embed_tokens.weight"):
                return meta.shape[0]
        return None
