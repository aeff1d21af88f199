"""Arcee Fusion (mergekit's `arcee_fusion`): the base, overwritten where the other model's change matters.

Two models: the base θ0 and one other θ1, δ = θ1 − θ0. Per tensor, with the rows taken along its
last dimension (a 1-D tensor is one row):

    p = softmax(θ1 row), q = softmax(θ0 row)
    KL(row) = Σj pj · log((pj + 1e-8) / (qj + 1e-8))          (KL(p ‖ q), one value per row)
    importance = |δ| · KL(row)                                 (each element, by its row's KL)
    Q1, M, Q3 = the k-th smallest importance, k = max(1, ⌊n·q⌋) for q = 0.25, 0.5, 0.75 (n elements)
    threshold = M + 1.5·(Q3 − Q1)                              (Tukey's fence above the median)
    merged = θ0 + mask·δ,   mask = [importance ≥ threshold]

so only the outlying changes (typically 5–10 % of the elements) move the base to θ1; the rest keep
θ0's values. This is the method as the mergekit docs and Arcee's announcement describe it (importance
from the change and a KL divergence, a median + 1.5·IQR threshold), with each step fixed by comparing
with mergekit 0.1.5's outputs (`tests/methods/test_arcee_fusion.py`); no code of mergekit is used.

Every step runs in the inputs' dtype (the recipe's `dtype` with `mergekit_order`; float32 in our own
arithmetic) except the mask, which is float32: for bfloat16/float16 inputs θ0 + mask·δ is float32, and
mergekit writes it so when the recipe has no `out_dtype` (we do too). The row sums of the KL are a
dot product per row in float32 and torch's sum of the rounded products in half precision — the order
that gives mergekit's bytes in every recorded case (bf16, fp16 and fp32); a threshold tie counts as
important (in bf16 the importance often equals the threshold exactly). The steps run on a CPU copy on
one thread, so a GPU gives the CPU's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext
from .common import ParamsMixin
from .mergekit_order import parse_order
from .sparsify import host, single_threaded

#: added to both probabilities inside the KL's logarithm
KL_EPS = 1e-8
#: Tukey's fence: the threshold is the median plus this many interquartile ranges
FENCE = 1.5


def fusion_mask(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The elements whose importance is above the threshold (float32 0/1, the shape of `base`), in
    the inputs' dtype, on the CPU."""
    b, o = host(base), host(other)
    rows0 = b.reshape(1, -1) if b.dim() < 2 else b.reshape(-1, b.shape[-1])
    rows1 = o.reshape(1, -1) if o.dim() < 2 else o.reshape(-1, o.shape[-1])
    with single_threaded():
        p = torch.softmax(rows1, dim=-1)
        q = torch.softmax(rows0, dim=-1)
        ratio = torch.log((p + KL_EPS) / (q + KL_EPS))
        if p.dtype in (torch.bfloat16, torch.float16):
            kl = (p * ratio).sum(dim=-1, keepdim=True)  # products rounded, then torch's sum
        else:
            kl = torch.einsum("ij,ij->i", p, ratio).unsqueeze(-1)  # a dot product per row
        importance = ((rows1 - rows0).abs() * kl).reshape(-1)
        n = importance.numel()
        q1, median, q3 = (torch.kthvalue(importance, max(1, int(n * f))).values for f in (0.25, 0.5, 0.75))
    threshold = median + FENCE * (q3 - q1)
    return (importance >= threshold).to(torch.float32).reshape(base.shape)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """θ0 + mask·δ of the module docstring: the inputs' dtype for float32 inputs, float32 for half ones."""
    mask = fusion_mask(base, other).to(base.device)
    return base + mask * (other - base)


@dataclass
class ArceeFusion(ParamsMixin, MergeMethod):
    """Arcee Fusion: the base, moved to the other model where its change's importance (|δ| × KL of the rows) is an outlier."""

    name: ClassVar[str] = "arcee_fusion"

    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    @staticmethod
    def _need_one(n_models: int) -> None:
        if n_models != 1:
            raise MergeError(f"Method 'arcee_fusion' merges the base with exactly one other model; got {n_models}.",
                             hint="List the base and one other model (in a mergekit recipe: base_model and one other).")

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        self._need_one(n_models)
        return [1.0]

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        self._need_one(len(taus))
        return arcee_fusion(base, base + taus[0])

    def params(self) -> dict[str, Any]:
        return {"mergekit_order": self.mergekit_order} if self.mergekit_order else {}

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        self._need_one(len(models))
        return arcee_fusion(base, models[0])


__all__ = ["ArceeFusion", "arcee_fusion", "fusion_mask"]
