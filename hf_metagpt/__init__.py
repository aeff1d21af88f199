"""hf-metagpt: merge fine-tuned LLMs with MetaGPT, streamed layer by layer, published to the Hub.

    >>> import hf_metagpt
    >>> result = hf_metagpt.merge(base="base/", models=["chat/", "math/"], output="merged/")
    >>> result.push_to_hub("me/merged")                     # doctest: +SKIP

Every error a user can cause is a `MergeError` (or a subclass below); its `hint` says what to do.
"""

from typing import TYPE_CHECKING

from ._logging import protect_loggers
from ._version import __version__
from .errors import (
    DownloadStopped,
    HubAccessError,
    HubUnavailableError,
    IncompatibleModelsError,
    InputError,
    IntegrityError,
    MainProcessStopped,
    MergeError,
    NonFiniteError,
    OutputError,
    RecipeError,
    TaskSpecError,
    UnsafePickleError,
    UnsupportedAdapterError,
)

# The entry points are imported when first used (as huggingface_hub's __init__ does): importing
# the package, or `hf metagpt --help` and a refusal of bad options, then need no torch (about
# 1-2 s of CPU per process), and `hf_metagpt.merge` still is the function, not a module.
_LAZY = {
    "merge": ".api",
    "plan": ".api",
    "MergePlan": ".engine.plan",
    "inspect": ".inspect_api",
    "InspectResult": ".insight.report",
    "MergeOptions": ".options",
    "MergeResult": ".result",
}

if TYPE_CHECKING:
    from .api import merge, plan
    from .engine.plan import MergePlan
    from .insight.report import InspectResult
    from .inspect_api import inspect
    from .options import MergeOptions
    from .result import MergeResult


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


protect_loggers()  # no signed URL or token in a log line of httpx or huggingface_hub (changes no level)

__all__ = [
    "DownloadStopped",
    "HubAccessError",
    "HubUnavailableError",
    "IncompatibleModelsError",
    "InspectResult",
    "InputError",
    "IntegrityError",
    "MainProcessStopped",
    "MergeError",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "NonFiniteError",
    "OutputError",
    "RecipeError",
    "TaskSpecError",
    "UnsafePickleError",
    "UnsupportedAdapterError",
    "inspect",
    "merge",
    "plan",
    "__version__",
]
