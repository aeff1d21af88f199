"""The sink: where a run's merged tensors go — chosen once per run from its shape (`api`).

`Sink` is the executor's only view of the output. Three implement it:

- `writer.ShardSink` — safetensors shards at their planned offsets, on a writer thread, resumable;
- `adapter_output.AdapterSink` — one exact LoRA adapter (`--output-format lora`);
- `NoOutput` — nothing: a run that only reduces norms (`inspect`).

The executor calls `finished`, `open`, then per merge step `alloc` and `write`, then `finish` (or
`abort` on failure); it starts and stops every thread a sink has.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch

from .schedule import Step
from .timeline import Meter

#: where merged tensors go: alloc(shape, dtype) -> an uninitialised CPU tensor (`writer.OutputArena`)
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default `Alloc`: new memory for every tensor."""
    return torch.empty(shape, dtype=dtype)


class Sink(Protocol):
    """Takes a run's merged tensors, step by step."""

    #: False: the run reduces norms only (pass 1 of a whole-model λ), nothing is merged
    writes: bool
    #: bytes of output written so far
    bytes_written: int
    #: share of ‖B·A‖² each module kept when an adapter was truncated to a rank (None: no truncation)
    energy: Mapping[str, float] | None
    #: time inside writes on the sink's own threads, and of it finishing output files (`timeline`)
    busy: Meter
    sync: Meter

    def finished(self) -> set[int]:
        """Output shards an earlier run finished (the schedule skips them)."""

    def open(self) -> None:
        """Start writing (threads, if any)."""

    def alloc(self, step: Step) -> Alloc:
        """Memory for `step`'s merged tensors (the sink may place them as it will write them)."""

    def write(self, step: Step, outs: list, ledger: dict | None) -> None:
        """The merged outputs of `step.write`, in order; `ledger`: the norms' state once they were known."""

    def finish(self, ledger: dict | None) -> None:
        """Every output written and saved (the ledger's final state with it)."""

    def abort(self) -> None:
        """Stop writing after a failure; keep nothing half written."""


class NoOutput:
    """The sink of a run that writes nothing (`inspect`: norms and Gram matrices only)."""

    writes = False
    bytes_written = 0
    energy = None

    def __init__(self) -> None:
        self.busy = Meter()
        self.sync = Meter()

    def finished(self) -> set[int]:
        return set()

    def open(self) -> None:
        pass

    def alloc(self, step: Step) -> Alloc:
        return fresh

    def write(self, step: Step, outs: list, ledger: dict | None) -> None:
        raise AssertionError("NoOutput writes nothing")

    def finish(self, ledger: dict | None) -> None:
        pass

    def abort(self) -> None:
        pass
