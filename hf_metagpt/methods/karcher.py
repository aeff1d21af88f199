"""Karcher mean (mergekit's `karcher`): the Riemannian (Fréchet) mean of the models on the unit sphere.

Each model's tensor θt (flattened) is split into its norm rt = ‖θt‖ and its direction ut = θt / rt.
With equal weights w = 1/N (mergekit ignores `weight` for this method, and so do we), the mean
direction m minimises Σt w·d(m, ut)², d the angle on the sphere; it is found by Karcher's fixed-point
iteration from the normalised Euclidean mean:

    m ← Σt w·ut,  m ← m / ‖m‖
    repeat at most `max_iter` times:
        cos θt = clamp(⟨m, ut⟩, −1, 1),  θt = acos(cos θt)
        T = Σt w·(θt / sin θt)·(ut − cos θt·m)      (the mean of the log maps; a term with θt < 1e-8 is 0)
        stop when ‖T‖ < `tol`
        m ← cos ‖T‖·m + sin ‖T‖·(T / ‖T‖),  m ← m / ‖m‖  (the exponential map)
    merged = (Σt w·rt) · m

A model whose tensor is all zeros has no direction: the mean direction is that of the other models
(w = 1/their number there), and it adds 0 to the mean norm, which stays Σt rt / N (if every model's
tensor is zero, so is the merge) — as mergekit does.

`karcher_mean` takes these steps in the inputs' dtype and in mergekit 0.1.5's order: with
`mergekit_order` float32 gives mergekit's bytes (checked bit for bit against its outputs,
`tests/methods/test_karcher.py`; mergekit run on one thread: its BLAS dot products sum in another order
with more threads). In bfloat16/float16 mergekit's own rounding of the iteration is not reproduced bit
for bit: 19 % of the elements are > 1 ulp from its outputs, and both are as far from the exact mean
(RMS error 0.8 % of the tensor's RMS for ours, 0.55–0.66 % for mergekit's; largest element 4.4 % vs
4.2 %). The angle and stopping tests compare Python floats (1e-8 is 0 in float16, and θ = 0 would
give 0/0). Our own arithmetic
(`combine`) runs the same iteration in float64. Norms and dot products are taken on CPU copies on
one thread, so a GPU gives the CPU's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from .base import MergeMethod, TensorContext
from .common import ParamsMixin, check_real
from .mergekit_order import parse_order
from .sparsify import host, single_threaded

#: an angle under this is taken as 0 (its log map is 0): θ/sin θ is 0/0 there
ANGLE_EPS = 1e-8


def _norm(x: torch.Tensor) -> torch.Tensor:
    with single_threaded():  # the same sum order on every machine (`sparsify.single_threaded`)
        return torch.norm(x)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with single_threaded():
        return torch.dot(a, b)


def karcher_mean(models: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of the module docstring, every step in the models' dtype (computed on the CPU)."""
    device, shape = models[0].device, models[0].shape
    w = 1.0 / len(models)
    xs = [host(t).reshape(-1) for t in models]
    norms = [_norm(x) for x in xs]
    units = [x / r for x, r in zip(xs, norms) if r > 0]
    if not units:
        return torch.zeros_like(models[0])
    wd = 1.0 / len(units)  # the directions' weight: the models with one
    m = torch.zeros_like(units[0])
    for u in units:
        m = m + wd * u
    m = m / _norm(m)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(m)
        for u in units:
            cos = torch.clamp(_dot(m, u), -1, 1)
            theta = torch.acos(cos)
            if float(theta) < ANGLE_EPS:  # a Python comparison: 1e-8 is 0 in float16
                continue
            tangent = tangent + (wd * (theta / torch.sin(theta))) * (u - cos * m)
        step = _norm(tangent)
        if float(step) < tol:
            break
        m = torch.cos(step) * m + torch.sin(step) * (tangent / step)
        m = m / _norm(m)
    scale = 0
    for r in norms:
        scale = scale + w * r
    return (m * scale).reshape(shape).to(device)


def _number(value: Any) -> Any:
    """YAML reads `1e-5` (no dot) as a string; mergekit takes it as the number, and so do we."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _max_iter(method: str, value: Any) -> int:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise MergeError(f"Method {method!r}: max_iter must be a whole number ≥ 0, got {value!r}.",
                         hint="e.g. max_iter: 10 (mergekit's default).")
    return int(value)


def _tol(method: str, value: Any) -> float:
    v = check_real(method, "tol", _number(value))
    if v < 0:
        raise MergeError(f"Method {method!r}: tol must be ≥ 0, got {value!r}.", hint="e.g. tol: 1e-5 (mergekit's default).")
    return v


@dataclass
class Karcher(ParamsMixin, MergeMethod):
    """Karcher (Riemannian) mean of the models' directions on the sphere, scaled by their mean norm."""

    name: ClassVar[str] = "karcher"

    max_iter: Any = 10
    tol: Any = 1e-5
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.max_iter = _max_iter(self.name, self.max_iter)
        self.tol = _tol(self.name, self.tol)
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False

    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        if n_models < 1:
            raise MergeError("Method 'karcher' needs at least one model.")
        return [1.0 / n_models] * n_models

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        """From θt = θ0 + τt (the base is only the reference the engine subtracted), in float64."""
        models = [(base.double() + tau.double()) for tau in taus]
        return karcher_mean(models, self.max_iter, self.tol).float()

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_iter": self.max_iter, "tol": self.tol}
        if self.mergekit_order:
            out["mergekit_order"] = self.mergekit_order
        return out

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return karcher_mean(models, self.max_iter, self.tol)


__all__ = ["Karcher", "karcher_mean"]
