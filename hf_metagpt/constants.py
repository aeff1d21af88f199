"""Environment switches of hf-metagpt, in one place (as `huggingface_hub.constants` keeps the Hub's).

Each is read when it is used, so a change takes effect for the next merge of the same process.
Hugging Face's own variables (`HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`, ...) are
read through `huggingface_hub.constants`, never here.
"""

from __future__ import annotations

import os

#: The unit budget in MiB: bytes of stored input of all models read at once (`engine.pieces`).
UNIT_ENV = "HF_METAGPT_UNIT_MB"
#: `0` turns O_DIRECT reads and writes off (`engine.reader`, `engine.writer`).
DIRECT_ENV = "HF_METAGPT_DIRECT_IO"
#: `0`: ask transformers every time instead of keeping its answers on disk (`sources.archcache`).
ARCH_CACHE_ENV = "HF_METAGPT_ARCH_CACHE"
#: Where converted pickle shards are kept (default: `$HF_HOME/hf-metagpt/converted`; `sources.pickle`).
PICKLE_CACHE_ENV = "HF_METAGPT_PICKLE_CACHE"
#: The first backoff delay of a retried Hub call, in seconds (doubled after each failure).
RETRY_BASE_ENV = "HF_METAGPT_RETRY_BASE"
#: The longest rate-limit reset (seconds) worth waiting for; a later one fails at once.
RATE_LIMIT_WAIT_ENV = "HF_METAGPT_RATE_LIMIT_MAX_WAIT"
#: The compute workers of a merge process, as `--workers N` sets them (`engine.sizing`).
WORKERS_ENV = "HF_METAGPT_WORKERS"
#: Elements per chunk of the CPU weighted sum, a power of two from 2^12 to 2^24 (default `engine.kernels.MERGE_CHUNK`,
#: 2^18; `engine.sizing.merge_chunk_override`). Elementwise: any value gives the same bytes, only the speed changes.
MERGE_CHUNK_ENV = "HF_METAGPT_MERGE_CHUNK"
#: MiB of a CLI merge's first reads to read into the page cache while it starts (default 4096, at most a
#: quarter of the available memory; by default for two-pass merges and from 8 cores); `0` turns it off
#: (`engine.readahead`).
READAHEAD_ENV = "HF_METAGPT_READAHEAD_MB"
#: A file a merge writes its time account to, as JSON (`engine.timeline`; unset: none written).
TIMELINE_ENV = "HF_METAGPT_TIMELINE"
#: A file a merge writes when each thread worked to, as a Chrome/Perfetto trace (`engine.trace`; unset: none).
TRACE_ENV = "HF_METAGPT_TRACE"
#: `1`: a GPU merge copies each piece to the device on the reader thread, from page-locked read
#: buffers (`engine.staging`); off by default until measured on a GPU machine.
GPU_STAGING_ENV = "HF_METAGPT_GPU_STAGING"
#: `hub serve`'s tokens besides --token: USER:TOKEN or TOKEN entries, separated by commas or whitespace.
HUB_TOKENS_ENV = "HF_METAGPT_HUB_TOKENS"


def env(name: str) -> str | None:
    """The variable's value, None when unset or empty."""
    return os.environ.get(name) or None


def direct_io_enabled() -> bool:
    """O_DIRECT reads and writes, unless `HF_METAGPT_DIRECT_IO=0` (or the platform has none)."""
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_ENV, "1") != "0"


def arch_cache_enabled() -> bool:
    """Keep transformers' answers about configs on disk, unless `HF_METAGPT_ARCH_CACHE=0`."""
    return os.environ.get(ARCH_CACHE_ENV, "1") != "0"


def seconds(name: str, default: float) -> float:
    """A duration in seconds from the variable `name` (≥ 0), else `default` (unset or not a number)."""
    try:
        return max(0.0, float(env(name) or default))
    except ValueError:
        return default
