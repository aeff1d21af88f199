"""hf-metagpt: merge fine-tuned LLMs with MetaGPT, streamed layer by layer, published to the Hub.

    >>> import hf_metagpt
    >>> result = hf_metagpt.merge(base="base/", models=["chat/", "math/"], output="merged/")
    >>> result.push_to_hub("me/merged")                     # doctest: +SKIP

Every error a user can cause is a `MergeError` (or a subclass below); its `hint` says what to do.
"""

from ._version import __version__  # noqa: E402

from ._logging import protect_loggers  # noqa: E402
from .api import merge, plan  # noqa: E402
from .engine.plan import MergePlan  # noqa: E402
from .errors import (  # noqa: E402
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
from .inspect_api import inspect  # noqa: E402
from .insight.report import InspectResult  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .result import MergeResult  # noqa: E402

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
