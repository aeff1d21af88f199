"""Shared pieces of the peer methods: parameter checks and the per-tensor TIES/DARE steps.

The tensor steps call peft's merge utilities (`peft.utils.merge_utils`) wherever their behaviour is
what we want, and say where we must differ:

- DARE's drop mask is drawn here with the tensor's own `torch.Generator`: peft's `random_pruning`
  calls `torch.bernoulli` on the global RNG, which cannot be seeded per tensor, so two passes or two
  processes would draw different masks.
- peft's sign election works on the stacked task tensors (T × numel, several such temporaries). It
  is elementwise across models, so we call it on slices of `CHUNK` elements: the same numbers, with
  memory bounded by the slice instead of the whole tensor.
- The TIES trim follows mergekit's counting and tie-breaking (`sparsify.magnitude`), not peft's.

The task-arithmetic family with mergekit's semantics (weighted sign election, weighted divisor)
is in `gta.py`; what is here serves the MetaGPT combinations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..errors import MergeError

#: Elements per slice for the steps that stack the models (sign election, disjoint merge).
CHUNK = 1 << 22

SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------------- parameters


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_real(method: str, name: str, value: Any) -> float:
    """A finite number (YAML ints welcome), else a MergeError naming the parameter."""
    if not _is_real(value):
        raise MergeError(f"Method {method!r}: {name} must be a finite number, got {value!r}.")
    return float(value)


def check_density(method: str, value: Any) -> float:
    """The fraction of entries kept, in (0, 1]."""
    density = check_real(method, "density", value)
    if not 0.0 < density <= 1.0:
        raise MergeError(
            f"Method {method!r}: density must be in (0, 1], got {value!r}.",
            hint="density is the fraction of each task vector kept (1 keeps everything); "
            "density 0 would drop everything and merge nothing.",
        )
    return density


def density_from_drop_rate(method: str, value: Any) -> float:
    """DARE's drop probability p, in [0, 1), as the kept fraction 1 − p."""
    p = check_real(method, "drop_rate", value)
    if not 0.0 <= p < 1.0:
        raise MergeError(
            f"Method {method!r}: drop_rate must be in [0, 1), got {value!r}.",
            hint="drop_rate is the probability of dropping an entry; 1 would drop everything.",
        )
    # Rounded so that drop_rate 0.9 records density 0.1, not 0.09999999999999998.
    return round(1.0 - p, 15)


def check_sign_method(method: str, value: Any) -> str:
    if value not in SIGN_METHODS:
        raise MergeError(
            f"Method {method!r}: majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {value!r}."
        )
    return value


class ParamsMixin:
    """`from_params`: build a method dataclass from recipe/CLI parameters, with aliases.

    `aliases` maps an accepted alternative name to (field, converter); unknown names and a field
    given twice (under two names) are MergeErrors that list what is accepted.
    """

    name: ClassVar[str]
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[str, Any], Any]]]] = {}

    @classmethod
    def from_params(cls, **params: Any) -> Any:
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in params.items():
            if key in cls.aliases:
                field, convert = cls.aliases[key]
                value = convert(cls.name, value)
            elif key in fields:
                field = key
            elif key == "lambda" and "lambda_" in fields:
                field = "lambda_"
            else:  # `get_method` refuses these first, naming near misses and the methods that take them
                raise MergeError(f"Unknown parameter {key!r} for method {cls.name!r}.",
                                 hint=f"It takes: {', '.join(sorted({*fields, *cls.aliases}))}.")
            if field in kwargs:
                raise MergeError(
                    f"Method {cls.name!r}: {given_as[field]!r} and {key!r} set the same parameter.",
                    hint="Give only one of them.",
                )
            kwargs[field], given_as[field] = value, key
        return cls(**kwargs)


def identity(method: str, value: Any) -> Any:
    return value


#: Accepted names for the task-arithmetic scale λ (mergekit's YAML can't spell `lambda_`).
LAMBDA_ALIASES: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "lambda": ("lambda_", identity),
    "scaling": ("lambda_", identity),
}


# --------------------------------------------------------------------------- tensor steps


def trim_top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: a new tensor keeping the max(1, int(density·numel)) largest |τ| entries, zeros elsewhere.

    mergekit's counting and tie-breaking (`sparsify.magnitude`: the order of torch's argsort at
    equal magnitudes), not peft's `magnitude_based_pruning` (topk, and k may be 0): a TIES recipe
    then keeps the same entries in both tools. density 1 returns a copy.
    """
    from .sparsify import magnitude

    return magnitude(tau, density)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale survivors by 1/density.

    Differs from peft's `random_pruning` only in drawing the Bernoulli mask from `generator`
    (seeded per tensor and model). Returns a new tensor (the mask's storage); density 1 (p = 0)
    returns `tau` itself, untouched, and draws nothing.
    """
    if density >= 1.0:
        return tau
    # Contiguous whatever tau's strides: the mask follows the logical (row-major) order.
    keep = torch.empty(tau.shape, dtype=tau.dtype, device=tau.device)
    keep.bernoulli_(density, generator=generator)
    return keep.mul_(tau).div_(density)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def keep_majority_sign_(taus: list[torch.Tensor], method: str = "total") -> list[torch.Tensor]:
    """TIES sign election, in place: zero every entry whose sign is not its parameter's elected sign.

    The elected sign is that of Σt τt ("total", the paper's) or of Σt sign(τt) ("frequency"); a sum
    of exactly 0 elects + (peft's `calculate_majority_sign_mask`: `>= 0`), so a parameter's
    positive entries survive. Zeros never agree with a sign, so they stay zero. `taus` must be
    contiguous tensors the caller owns.

    The sum is taken in model order, one elementwise float32 addition after another (peft's
    `tensor.sum(dim=0)` over the stacked models, on the CPU): a GPU's reduction may add in
    another order, and near-cancelling sums can then round to the other sign.
    """
    check_sign_method("ties", method)
    flats = [_flat(t) for t in taus]
    n = flats[0].numel()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        total = None
        for f in flats:
            term = f[start:stop] if method == "total" else f[start:stop].sign()
            total = term.clone() if total is None else total.add_(term)
        assert total is not None
        elected = torch.where(total >= 0, 1.0, -1.0).to(flats[0].dtype)
        del total
        for f in flats:
            f[start:stop].mul_(f[start:stop].sign() == elected)
    return taus
