"""Merge methods: pure tensor math behind one interface (see `base.MergeMethod`)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import MergeError
from .base import MergeMethod, TensorContext, squared_norm, weighted_sum
from .dare import DareLinear, DareTies, MetaGPTDare
from .gta import Breadcrumbs, BreadcrumbsTies, Della, DellaLinear
from .interpolation import SCE, ModelStock, Slerp
from .linear import Linear
from .metagpt import MetaGPT, metagpt_lambdas, metagpt_merge
from .task_arithmetic import TaskArithmetic
from .ties import MetaGPTTies, Ties

#: name -> factory taking the method's parameters as keyword arguments.
METHODS: dict[str, Callable[..., MergeMethod]] = {
    "metagpt": MetaGPT,
    "metagpt_dare": MetaGPTDare.from_params,
    "metagpt_ties": MetaGPTTies.from_params,
    "linear": Linear.from_params,
    "task_arithmetic": TaskArithmetic.from_params,
    "ties": Ties.from_params,
    "dare_linear": DareLinear.from_params,
    "dare_ties": DareTies.from_params,
    "dare": DareLinear.from_params,  # alias: DARE with task arithmetic, recorded as dare_linear
    "breadcrumbs": Breadcrumbs.from_params,
    "breadcrumbs_ties": BreadcrumbsTies.from_params,
    "della": Della.from_params,
    "della_linear": DellaLinear.from_params,
    "slerp": Slerp.from_params,
    "model_stock": ModelStock.from_params,
    "sce": SCE.from_params,
}


def get_method(name: str, **params: Any) -> MergeMethod:
    """Build a method by its CLI/recipe name with its parameters."""
    try:
        factory = METHODS[name]
    except KeyError:
        raise MergeError(
            f"Unknown merge method {name!r}.", hint=f"Choose one of: {', '.join(sorted(METHODS))}."
        ) from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise MergeError(f"Bad parameters for method {name!r}: {exc}") from None


__all__ = [
    "METHODS",
    "SCE",
    "Breadcrumbs",
    "BreadcrumbsTies",
    "Della",
    "DellaLinear",
    "ModelStock",
    "Slerp",
    "DareLinear",
    "DareTies",
    "Linear",
    "MergeMethod",
    "MetaGPT",
    "MetaGPTDare",
    "MetaGPTTies",
    "TaskArithmetic",
    "Ties",
    "TensorContext",
    "get_method",
    "metagpt_lambdas",
    "metagpt_merge",
    "squared_norm",
    "weighted_sum",
]
