"""What transformers says of a config, kept on disk: a pure function of the config and the release.

The plan's architecture checks ask transformers two things of a config: its value (defaults
filled in) of the fields that must agree between models, and the parameter names and shapes of the
model it describes (an empty `meta` model). Asking means importing transformers' configuration and
modeling code and building that model: about 3 s, most of a small merge's start-up, the same answer
every time for the same config.json and transformers version. So each answer is kept in a small
JSON file under `$HF_HOME/hf-metagpt/architectures/`, named by a hash of both; an entry that cannot
be read is simply asked again, and a failed answer (an architecture transformers does not know) is
never kept. Hand-written: neither transformers nor huggingface_hub caches derived config facts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..constants import arch_cache_enabled

log = logging.getLogger(__name__)



def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf-metagpt" / "architectures"


@functools.lru_cache(maxsize=1)
def _transformers_version() -> str | None:
    """The installed transformers release, read once per process (each read parses its METADATA)."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def entry_path(kind: str, config: dict[str, Any]) -> Path | None:
    """Where the answer of `kind` for `config` is kept (None: not cacheable)."""
    version = _transformers_version()
    if version is None or not arch_cache_enabled():
        return None
    try:
        blob = json.dumps({"kind": kind, "transformers": version, "config": config}, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"


def cached(kind: str, config: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()`'s JSON value for this config and transformers release, from disk when known.

    None (transformers could not answer) is returned but not kept; a cache that cannot be written
    (read-only home) only costs the next run the same time again.
    """
    path = entry_path(kind, config)
    if path is not None:
        try:
            return json.loads(path.read_text())["value"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    value = compute()
    if path is not None and value is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"value": value}, f)
                os.replace(tmp, path)  # atomic: two runs writing the same entry both write the same value
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except (OSError, TypeError, ValueError) as exc:
            log.debug("architecture cache not written (%s)", exc)
    return value
