"""The interface every merge method implements: pure tensor math, no I/O.

The streaming engine hands a method, for one tensor at a time, the base tensor and the task
vectors τt = θt − θ0 (float32, same device). A method may

1. `transform` the task vectors (DARE drops, TIES trims and elects signs) — deterministically,
   seeded from `TensorContext.seed`, because the paper's whole-model λ reads every tensor twice;
2. ask the engine for per-group squared norms of the (transformed) task vectors
   (`uses_group_norms`), which the engine reduces over the group chosen by `--granularity`;
3. turn a group's norms into per-model `coefficients`;
4. `combine` base, task vectors and coefficients into the merged tensor.

Keeping (2) in the engine is what lets MetaGPT's whole-model reduction stream: the method never
sees more than one tensor.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from ..sources.architecture import layer_of


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it is merging.

    `layer` is the N of the tensor's block, `*.layers.N.*` or `*.h.N.*` (`architecture.layer_of`;
    None for embeddings, final norm, head) and `n_layers` the
    model's `num_hidden_layers`: mergekit-style parameters given as lists are interpolated across
    the layers with them, and `- filter:` entries match `name` (`methods/settings.py`).
    """

    name: str
    seed: int | None = None
    layer: int | None = None
    n_layers: int | None = None

    @classmethod
    def of(cls, name: str, seed: int | None = None, n_layers: Any = None) -> "TensorContext":
        """The context of tensor `name`: its layer from its block (`architecture.layer_of`, as the plan's groups)."""
        return cls(name, seed, layer_of(name),
                   n_layers if isinstance(n_layers, int) and not isinstance(n_layers, bool) else None)

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from (seed, tensor name, model index).

        Independent of processing order, so two passes, a resumed run or several processes draw
        the same random numbers for the same tensor.
        """
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{model_index}".encode()).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        return gen


def squared_norm(t: torch.Tensor) -> float:
    """‖t‖² accumulated in float64 (float32 sums of millions of squares lose digits)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) if t.numel() else 0.0


class MergeMethod(ABC):
    """A merge method. Subclasses are small dataclasses holding their parameters."""

    name: ClassVar[str]
    #: True when `coefficients` needs the group's squared task-vector norms.
    uses_group_norms: ClassVar[bool] = False
    #: True when `transform` draws random numbers (recorded so a merge can be reproduced).
    uses_seed: ClassVar[bool] = False
    #: The dtype name mergekit's arithmetic runs in ("auto": the inputs' own), or False: ours
    #: (`mergekit_order.py`; methods that have `mergekit_merge` take it as a parameter).
    mergekit_order: str | bool = False

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        """Sparsify or otherwise rewrite the task vectors of one tensor (default: unchanged)."""
        return taus

    @abstractmethod
    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        """Per-model coefficients for one group (`sq_norms` is None unless `uses_group_norms`)."""

    @abstractmethod
    def combine(
        self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
        ctx: TensorContext | None = None,
    ) -> torch.Tensor:
        """The merged tensor (float32). May reuse `base`'s or the taus' storage.

        `ctx` (None: the method's plain parameters) lets a method resolve per-tensor parameters
        (layer gradients, name filters) for this tensor.
        """

    def params(self) -> dict[str, Any]:
        """Parameters to record in the coefficients file and card (so a merge reproduces)."""
        return {}

    def model_weights(
        self, coeffs: Sequence[float], ctx: TensorContext | None = None
    ) -> tuple[float, list[float]] | None:
        """(w0, [w1..wT]) when `combine` equals w0·θ0 + Σt wt·θt for untransformed task vectors.

        Lets the engine merge such methods with fused chunked kernels (`kernels.py`) instead of
        full-size float32 task vectors. None (the default) means: call `combine`. `ctx` as in
        `combine`: the weights of that tensor.
        """
        return None

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        """The merged tensor with mergekit's arithmetic, from inputs already in its dtype
        (`methods/mergekit_order.py`); methods that have it override this."""
        raise MergeError(f"Method {self.name!r} has no mergekit arithmetic.", hint="Use --arithmetic own.")


def weighted_sum(base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """θ0 + Σ ct τt, accumulated in place into `base` (no per-model temporaries)."""
    out = base
    for c, tau in zip(coeffs, taus):
        if c != 0.0:
            out.add_(tau, alpha=float(c))
    return out
