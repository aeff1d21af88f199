"""Counters of one merge run (bytes read and written, passes, reused shards, time)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamStats:
    bytes_read: int = 0
    bytes_written: int = 0
    passes: int = 1
    shards_reused: int = 0
    seconds: float = 0.0
    pieces_read: int = 0  # pooled reads (pieces, reduce-only steps included)
    largest_read: int = 0  # bytes of the largest pooled read: the engine holds at most two
    device: str = ""  # where the arithmetic ran ("cpu", "cuda:0")
    workers: int = 1  # compute threads (a GPU run: the one that issues its work)
    readers: int = 1  # threads reading a piece's inputs
    #: GPU staging (`engine.staging`): spans copied on the reader threads, inputs found staged by
    #: the kernel (hits) or copied by it (misses); empty when the run did not stage
    staging: dict[str, int] = field(default_factory=dict)
