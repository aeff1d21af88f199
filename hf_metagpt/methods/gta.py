"""The task-arithmetic family with mergekit's semantics: task arithmetic, TIES, DARE, Breadcrumbs, DELLA.

Per tensor, with wt the weight of fine-tune t (default 1) and λ the scale:

1. sparsify each τt (none, TIES magnitude, DARE random, Breadcrumbs outliers, DELLA MagPrune);
2. with sign consensus (the `*ties` methods and `della`), elect each parameter's sign from the
   *weighted* task vectors, Σt wt τ̃t ("total", the TIES paper's) or Σt sign(wt τ̃t)
   ("frequency"), ≥ 0 electing +, and keep the agreeing entries (mt = 1);
3. merged = θ0 + λ · Σt wt mt τ̃t / D, where D = Σt wt mt (the *sum of the agreeing weights*,
   1 where it is 0) with consensus, D = Σt wt (1 where |D| < 1e-8) without, and D = 1 unless
   `normalize` (defaults per method as in mergekit: true for ties and della, false for the rest).

With weights 1 and normalize, TIES is the paper's disjoint mean (D = agreeing count); mergekit
generalises it to weights, and so do we. The sums run in float32 in model order, as mergekit's do
when it computes in float32, so deterministic methods agree with it within 1 ulp of the output.

Every parameter may be a per-tensor setting (`settings.py`: layer gradients, name filters), and
`per_model` overrides density/gamma/epsilon per fine-tune (mergekit's per-model `parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from . import sparsify
from .base import MergeMethod, TensorContext
from .common import LAMBDA_ALIASES, SIGN_METHODS, ParamsMixin, check_density, check_real
from . import mergekit_order
from .mergekit_order import parse_order
from .settings import describe, first_set, parse_setting, per_model_list

#: The TIES paper keeps the top 20% (k = 20) in its main experiments.
DEFAULT_TIES_DENSITY = 0.2
#: Keep half of each task vector (p = 0.5); the DARE paper shows SFT deltas survive far higher p.
DEFAULT_DARE_DENSITY = 0.5

PER_MODEL_KEYS = ("weight", "density", "gamma", "epsilon")


def _drop_rate(method: str, value: Any) -> float:
    p = check_real(method, "drop_rate", value)
    if not 0.0 <= p < 1.0:
        raise MergeError(f"Method {method!r}: drop_rate must be in [0, 1), got {value!r}.",
                         hint="drop_rate is the probability of dropping an entry; 1 would drop everything.")
    return round(1.0 - p, 15)


def _fraction(name: str):
    def check(method: str, value: Any) -> float:
        v = check_real(method, name, value)
        if not 0.0 <= v < 1.0:
            raise MergeError(f"Method {method!r}: {name} must be in [0, 1), got {value!r}.")
        return v
    return check


def _bool(name: str):
    def check(method: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise MergeError(f"Method {method!r}: {name} must be true or false, got {value!r}.")
        return value
    return check


def elect_signs_(taus: list[torch.Tensor], weights: Sequence[float], method: str = "total") -> list[torch.Tensor]:
    """Zero, in place, every entry whose weighted sign disagrees with its parameter's elected sign.

    Elected: sign of Σt wt τt ("total") or of Σt sign(wt τt) ("frequency"), + when the sum is 0.
    Entries with wt τt = 0 never agree (so they stay or become 0 and leave the divisor).
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    total = None
    for wt, tau in zip(w, taus):
        term = tau * wt if method == "total" else (tau * wt).sign()
        total = term if total is None else total.add_(term)
    assert total is not None
    elected = (total >= 0).to(torch.float32).mul_(2).sub_(1)
    del total
    for wt, tau in zip(w, taus):
        agree = (tau * wt).sign_() == elected
        tau.mul_(agree)
    return taus


@dataclass
class TaskArithmeticFamily(ParamsMixin, MergeMethod):
    """Common parameters and the weighted, normalised sum (subclasses pick the steps)."""

    name: ClassVar[str] = "task_arithmetic"
    aliases: ClassVar = {**LAMBDA_ALIASES, "drop_rate": ("density", _drop_rate)}
    sparsifier: ClassVar[str | None] = None
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False
    default_density: ClassVar[float] = 1.0
    #: extra per-model parameters of the sparsifier, with their defaults
    extra: ClassVar[dict[str, float]] = {}

    weights: list[Any] | None = None
    lambda_: Any = 1.0
    normalize: bool | None = None
    per_model: list[dict[str, Any]] | None = None
    int8_mask: bool = False  # mergekit's mask storage switch: no effect on the values
    #: compute as mergekit does in this dtype (`mergekit_order.py`; set by mergekit recipes) instead of
    #: our float32/float64 sums: False, "auto" or a dtype name (True: float32)
    mergekit_order: Any = False

    def __post_init__(self) -> None:
        self.mergekit_order = parse_order(self.name, self.mergekit_order) or False
        self.weights = per_model_list(self.name, "weights", self.weights, lambda m, v: check_real(m, "weights", v))
        self.lambda_ = parse_setting(self.name, "lambda_", self.lambda_, lambda m, v: check_real(m, "lambda", v))
        self.normalize = self.default_normalize if self.normalize is None else _bool("normalize")(self.name, self.normalize)
        _bool("int8_mask")(self.name, self.int8_mask)
        if self.per_model is not None:
            if not isinstance(self.per_model, list) or not all(isinstance(p, dict) for p in self.per_model):
                raise MergeError(f"Method {self.name!r}: per_model must be a list of mappings, one per fine-tune.")
            allowed = [k for k in PER_MODEL_KEYS[1:] if self._has(k)]
            parsed = []
            for entry in self.per_model:
                out = {}
                for key, value in entry.items():
                    if key not in allowed:
                        raise MergeError(f"Unknown per-model parameter {key!r} for method {self.name!r}.",
                                         hint=f"Accepted: {', '.join(allowed) or 'none'} (and weights).")
                    out[key] = None if value is None else parse_setting(self.name, key, value, self._checker(key))
                parsed.append(out)
            self.per_model = parsed

    # ---------------------------------------------------------------- parameters per tensor
    def _has(self, key: str) -> bool:
        return key == "density" and self.sparsifier is not None or key in self.extra

    def _checker(self, key: str):
        if key == "density":
            return check_density
        return _fraction(key)

    def _model_param(self, key: str, index: int, ctx: TensorContext | None) -> Any:
        own = self.per_model[index].get(key) if self.per_model and index < len(self.per_model) else None
        default = self.default_density if key == "density" else self.extra.get(key)
        return first_set(ctx, own, getattr(self, key, None), default=default)

    def tensor_weights(self, n_models: int, ctx: TensorContext | None = None) -> list[float]:
        """wt of each fine-tune for this tensor (1 where not set)."""
        if self.weights is None:
            return [1.0] * n_models
        self._check_count(n_models)
        return [float(first_set(ctx, w, default=1.0)) for w in self.weights]

    def tensor_lambda(self, ctx: TensorContext | None = None) -> float:
        return float(first_set(ctx, self.lambda_, default=1.0))

    def _check_count(self, n_models: int) -> None:
        for what, given in (("weights", self.weights), ("per_model", self.per_model)):
            if given is not None and len(given) != n_models:
                raise MergeError(
                    f"Method {self.name!r}: {len(given)} {what} given for {n_models} fine-tunes.",
                    hint="Give one per fine-tune, in the order the fine-tunes are listed.")

    # ---------------------------------------------------------------- MergeMethod
    def coefficients(self, sq_norms: Sequence[float] | None, n_models: int) -> list[float]:
        """λ·wt/D for the plain parameters (the recorded coefficients; D only without consensus)."""
        self._check_count(n_models)
        w = self.tensor_weights(n_models)
        lam = self.tensor_lambda()
        d = _plain_divisor(w) if self.normalize and not self.consensus else 1.0
        return [lam * x / d for x in w]

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], coeffs: Sequence[float],
                ctx: TensorContext | None = None) -> torch.Tensor:
        """θ0 + λ Σ wt τ̃t / D; the weights are this tensor's (`ctx`), `coeffs` only record them."""
        w = self.tensor_weights(len(taus), ctx)
        w32 = torch.tensor(w, dtype=torch.float32, device=base.device)
        mixed = None
        divisor = None
        for wt, tau in zip(w32, taus):
            term = tau * wt
            mixed = term if mixed is None else mixed.add_(term)
            if self.consensus and self.normalize:
                share = (tau != 0).to(torch.float32).mul_(wt)
                divisor = share if divisor is None else divisor.add_(share)
        if mixed is None:
            return base
        if self.normalize:
            if self.consensus:
                assert divisor is not None
                divisor[divisor == 0] = 1
            else:
                divisor = w32.sum()
                if divisor.abs() < 1e-8:
                    divisor = torch.ones((), dtype=torch.float32, device=base.device)
            mixed.div_(divisor)
        lam = self.tensor_lambda(ctx)
        if lam != 1:
            mixed.mul_(lam)
        return base.add_(mixed)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": None if self.weights is None else [describe(w) for w in self.weights],
                               "lambda_": describe(self.lambda_), "normalize": self.normalize}
        if self.per_model is not None:
            out["per_model"] = [{k: describe(v) for k, v in p.items()} for p in self.per_model]
        if self.mergekit_order:
            out["mergekit_order"] = self.mergekit_order
        return out

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return mergekit_order.task_arithmetic_family(self, base, models, ctx)


def _plain_divisor(w: Sequence[float]) -> float:
    total = float(torch.tensor(list(w), dtype=torch.float32).sum())
    return 1.0 if abs(total) < 1e-8 else total


@dataclass
class TaskArithmetic(TaskArithmeticFamily):
    """Task arithmetic (Ilharco et al., ICLR 2023): θ0 + λ Σt wt τt (÷ Σ wt with normalize)."""

    name: ClassVar[str] = "task_arithmetic"

    def model_weights(self, coeffs: Sequence[float], ctx: TensorContext | None = None) -> tuple[float, list[float]] | None:
        if self.mergekit_order:
            return None  # the method path: mergekit's steps in its dtype (`mergekit_order.py`)
        # θ0 + Σ ct (θt − θ0) = (1 − Σ ct)·θ0 + Σ ct·θt, with this tensor's ct.
        w = self.tensor_weights(len(coeffs), ctx)
        lam = self.tensor_lambda(ctx)
        d = _plain_divisor(w) if self.normalize else 1.0
        c = [lam * x / d for x in w]
        return 1.0 - float(sum(c)), c


@dataclass
class SparseTaskArithmetic(TaskArithmeticFamily):
    """A family member with a sparsifier and/or sign consensus (a `transform`)."""

    density: Any = None
    rescale: bool | None = None
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density is not None:
            self.density = parse_setting(self.name, "density", self.density, check_density)
        self.rescale = self.default_rescale if self.rescale is None else _bool("rescale")(self.name, self.rescale)
        if self.majority_sign_method not in SIGN_METHODS or not self.consensus and self.majority_sign_method != "total":
            allowed = SIGN_METHODS if self.consensus else ("total",)
            raise MergeError(f"Method {self.name!r}: majority_sign_method must be one of {', '.join(allowed)}, "
                             f"got {self.majority_sign_method!r}.")
        for key in self.extra:
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, parse_setting(self.name, key, value, self._checker(key)))
        if self.density is None:
            self.density = self.default_density

    def sparsify_one(self, tau: torch.Tensor, index: int, ctx: TensorContext) -> torch.Tensor:
        density = float(self._model_param("density", index, ctx))
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(tau, density, self.rescale)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(tau, density, float(self._model_param("gamma", index, ctx)), self.rescale)
        if self.sparsifier == "random":
            return sparsify.random(tau, density, ctx.generator(index, tau.device), self.rescale)
        if self.sparsifier == "della_magprune":
            return sparsify.della_magprune(tau, density, float(self._model_param("epsilon", index, ctx)),
                                           ctx.generator(index, tau.device), self.rescale, self.name)
        return tau.clone()

    def transform(self, taus: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        self._check_count(len(taus))
        out = [self.sparsify_one(t, i, ctx) for i, t in enumerate(taus)]
        out = [o.clone() if o is t else o.contiguous() for o, t in zip(out, taus)]
        if self.consensus:
            elect_signs_(out, self.tensor_weights(len(out), ctx), self.majority_sign_method)
        return out

    def params(self) -> dict[str, Any]:
        out = {"density": describe(self.density), **super().params()}
        if self.consensus:
            out["majority_sign_method"] = self.majority_sign_method
        out["rescale"] = self.rescale
        for key, default in self.extra.items():
            value = getattr(self, key)
            out[key] = default if value is None else describe(value)
        return out

    def mergekit_merge(self, base: torch.Tensor, models: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return mergekit_order.task_arithmetic_family(self, base, models, ctx, sparsify=self.sparsify_one)


@dataclass
class Ties(SparseTaskArithmetic):
    """TIES-Merging (Yadav et al., NeurIPS 2023): magnitude trim (default density 0.2), weighted sign election."""

    name: ClassVar[str] = "ties"
    sparsifier: ClassVar[str | None] = "magnitude"
    consensus: ClassVar[bool] = True
    default_normalize: ClassVar[bool] = True
    default_density: ClassVar[float] = DEFAULT_TIES_DENSITY


@dataclass
class DareLinear(SparseTaskArithmetic):
    """DARE (Yu et al., ICML 2024) then task arithmetic; default density 0.5."""

    name: ClassVar[str] = "dare_linear"
    uses_seed: ClassVar[bool] = True
    sparsifier: ClassVar[str | None] = "random"
    default_rescale: ClassVar[bool] = True
    default_density: ClassVar[float] = DEFAULT_DARE_DENSITY


@dataclass
class DareTies(DareLinear):
    """DARE then weighted sign election; not normalised by default (mergekit's dare_ties)."""

    name: ClassVar[str] = "dare_ties"
    consensus: ClassVar[bool] = True


@dataclass
class Breadcrumbs(SparseTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky, 2023): drop the γ largest and the smallest magnitudes."""

    name: ClassVar[str] = "breadcrumbs"
    sparsifier: ClassVar[str | None] = "magnitude_outliers"
    extra: ClassVar[dict[str, float]] = {"gamma": 0.01}

    gamma: Any = None


@dataclass
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs' sparsifier with TIES' weighted sign election (not normalised by default)."""

    name: ClassVar[str] = "breadcrumbs_ties"
    consensus: ClassVar[bool] = True


@dataclass
class Della(SparseTaskArithmetic):
    """DELLA (Deep et al., 2024): MagPrune (rank-dependent keep probability ±ε), sign election, normalised."""

    name: ClassVar[str] = "della"
    uses_seed: ClassVar[bool] = True
    sparsifier: ClassVar[str | None] = "della_magprune"
    consensus: ClassVar[bool] = True
    default_normalize: ClassVar[bool] = True
    default_rescale: ClassVar[bool] = True
    extra: ClassVar[dict[str, float]] = {"epsilon": 0.15}

    epsilon: Any = None


@dataclass
class DellaLinear(Della):
    """DELLA's MagPrune then task arithmetic (no sign election, not normalised by default)."""

    name: ClassVar[str] = "della_linear"
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
