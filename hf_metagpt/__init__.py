"""hf-metagpt: merge fine-tuned LLMs with MetaGPT, streamed layer by layer, published to the Hub.

    >>> import hf_metagpt
    >>> result = hf_metagpt.merge(base="base/", models=["chat/", "math/"], output="merged/")
"""

__version__ = "0.1.0"

from .api import merge, plan  # noqa: E402
from .engine.plan import MergePlan  # noqa: E402
from .errors import MergeError  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .result import MergeResult  # noqa: E402

__all__ = ["MergeError", "MergeOptions", "MergePlan", "MergeResult", "merge", "plan", "__version__"]
