"""Merge methods: pure tensor math behind one interface (see `base.MergeMethod`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..errors import MergeError
from .base import MergeMethod, TensorContext, squared_norm, weighted_sum
from .arcee_fusion import ArceeFusion
from .dare import DareLinear, DareTies, MetaGPTDare
from .gta import Breadcrumbs, BreadcrumbsTies, Della, DellaLinear
from .interpolation import SCE, ModelStock, Slerp
from .karcher import Karcher
from .linear import Linear
from .metagpt import MetaGPT, metagpt_lambdas, metagpt_merge
from .nuslerp import NuSlerp
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
    "nuslerp": NuSlerp.from_params,
    "karcher": Karcher.from_params,
    "arcee_fusion": ArceeFusion.from_params,
}


#: fields a recipe translator sets (mergekit's per-model values, its float32 order): not for users to type
INTERNAL_PARAMETERS = frozenset({"per_model", "mergekit_order"})
#: how a field is spelled by users where Python needs another name
USER_NAMES = {"lambda_": "lambda"}
#: the methods a "which method takes it" hint proposes first (the common peers of MetaGPT)
_PREFERRED = ("ties", "linear", "task_arithmetic", "slerp", "dare_ties", "dare_linear", "model_stock")
#: a value of each parameter, for messages (the syntax a user can copy)
_EXAMPLES = {"weights": "weights=[0.3,0.7]", "max_iter": "max_iter=10", "tol": "tol=1e-5", "density": "density=0.5", "lambda": "lambda=1.0", "t": "t=0.5",
             "normalize": "normalize=true", "rescale": "rescale=true", "majority_sign_method": "majority_sign_method=total",
             "epsilon": "epsilon=0.15", "gamma": "gamma=0.01", "select_topk": "select_topk=0.5",
             "filter_wise": "filter_wise=false", "int8_mask": "int8_mask=false"}


def canonical_method(name: Any) -> Any:
    """'TIES', ' Dare-Linear ' -> 'ties', 'dare_linear' (other values are returned unchanged)."""
    return name.strip().lower().replace("-", "_") if isinstance(name, str) else name


def _method_class(name: str) -> type:
    factory = METHODS[name]
    return getattr(factory, "__self__", factory)  # `Cls.from_params` -> Cls


def parameter_names(name: str) -> list[str]:
    """The parameters of method `name` as users write them (`lambda`, not `lambda_`; no internal fields)."""
    cls = _method_class(canonical_method(name))
    if not dataclasses.is_dataclass(cls):
        return []
    return [USER_NAMES.get(f.name, f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in INTERNAL_PARAMETERS]


def accepted_parameters(name: str) -> set[str]:
    """Every key method `name` takes: its fields (the Python spelling too) and their aliases."""
    cls = _method_class(canonical_method(name))
    if not dataclasses.is_dataclass(cls):
        return set()
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return fields | set(USER_NAMES.get(f, f) for f in fields) | set(getattr(cls, "aliases", {}))


def summary(name: str) -> str:
    """The first line of the method's docstring (for `merge --help`)."""
    return ((_method_class(name).__doc__ or "").strip().splitlines() or [""])[0]


def _example(param: str) -> str:
    return "--param " + _EXAMPLES.get(param, f"{param}=VALUE")


def unknown_parameter(method: str, key: str) -> MergeError:
    """The error for a parameter `method` does not take: a near miss, the methods that take it, the syntax."""
    import difflib

    method = canonical_method(method)
    names = parameter_names(method)
    hints: list[str] = []
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6) if names else []
    if close:
        hints.append(f"Did you mean {close[0]!r}?")
    takers = [m for m in METHODS if m != method and m != "dare" and key in parameter_names(m)]
    if takers and not close:
        best = next((m for m in _PREFERRED if m in takers), takers[0])
        hints.append(f"{key} is a parameter of {', '.join(takers)}: e.g. --method {best} "
                     f"(method=\"{best}\" in Python).")
    if names:
        hints.append(f"{method} takes: {', '.join(_example(n)[8:] for n in names)}.")
    else:
        hints.append(f"{method} takes no parameters"
                     + (" (its λ come from the task vectors' norms)." if _method_class(method).uses_group_norms else "."))
    hints.append("Lists go in brackets, e.g. --param weights=[0.3,0.7] (parameters={\"weights\": [0.3, 0.7]} in "
                 "Python); `hf-metagpt merge --help` describes each method.")
    return MergeError(f"Unknown parameter {key!r} for method {method!r}.", hint=" ".join(hints))


def unknown_method(name: Any) -> MergeError:
    import difflib

    close = difflib.get_close_matches(canonical_method(str(name)), list(METHODS), n=1, cutoff=0.6)
    hint = (f"Did you mean {close[0]!r}? " if close else "") + f"Choose one of: {', '.join(sorted(METHODS))} " \
        "(`hf-metagpt merge --help` describes each)."
    return MergeError(f"Unknown merge method {name!r}.", hint=hint)


def get_method(name: str, **params: Any) -> MergeMethod:
    """Build a method by its CLI/recipe name (any case, `-` or `_`) with its parameters."""
    key = canonical_method(name)
    if key not in METHODS:
        raise unknown_method(name)
    accepted = accepted_parameters(key)
    for param in params:
        if param not in accepted:
            raise unknown_parameter(key, param)
    try:
        return METHODS[key](**params)
    except TypeError as exc:
        raise MergeError(f"Bad parameters for method {key!r}: {exc}") from None


__all__ = [
    "METHODS",
    "ArceeFusion",
    "Karcher",
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
    "NuSlerp",
    "TaskArithmetic",
    "Ties",
    "TensorContext",
    "canonical_method",
    "get_method",
    "parameter_names",
    "metagpt_lambdas",
    "metagpt_merge",
    "squared_norm",
    "weighted_sum",
]
