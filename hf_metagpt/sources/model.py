"""`ModelInfo`: what is known of one input before any weight is read (its config and tensor headers)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ..safetensors_io import TensorMeta
from .refs import ModelRef


@dataclass(frozen=True)
class ModelInfo:
    """What the plan knows of one input model: its config and its tensors' headers.

    For a Hub input, `files` is the repo's file listing at the pinned commit (name -> size).
    """

    ref: ModelRef
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    weight_files: list[str]
    files: Mapping[str, int | None] | None = None
    #: pickle-only weights (`--allow-pickle`): a `sources.pickle.PickleSource` saying where the .bin shards are
    pickle: Any = None
    #: where the weight files are read when not under `ref.local_path` (converted pickle shards)
    weights_dir: Path | None = None
    #: `model+adapter` (mergekit's reference): the LoRA adapter applied to this model before the merge
    #: (`sources/lora_applied.py`); None once applied or for a plain input
    lora_applied: Any = None

    def at(self, folder: Path) -> "ModelInfo":
        """The same input, its files now in a local folder (a Hub snapshot downloaded for the merge)."""
        return replace(self, ref=self.ref.with_local_path(folder))

    @property
    def name(self) -> str:
        return self.ref.display

    @property
    def provisional(self) -> bool:
        """Tensor names from a `.bin` index, shapes from the config: not converted (nor checked) yet."""
        return self.pickle is not None and self.weights_dir is None

    @property
    def files_dir(self) -> Path | None:
        """The folder the weight files are read from."""
        return self.weights_dir or self.ref.local_path

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of this model's version of base tensor `name` (adapters answer for the base's names)."""
        return self.tensors[name].shape

    @property
    def vocab_rows(self) -> int | None:
        for name, meta in self.tensors.items():
            if name.endswith("embed_tokens.weight"):
                return meta.shape[0]
        return None
