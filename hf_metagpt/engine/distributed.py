"""Scale-out over processes with accelerate: which process writes which shards, and the collectives.

`accelerate launch --multi_gpu --num_processes N -m hf_metagpt merge ...` (torchrun underneath;
it works on a machine without GPUs too, with `--device cpu` the processes talk over gloo) or
`hf-metagpt merge --num-processes N ...` runs one merge in N processes:

* The main process checks the output, plans, prepares the work folder and downloads Hub inputs;
  it then sends the plan to every process (`World.broadcast`), so all of them merge exactly the
  same plan (a Hub branch that moves meanwhile cannot split them).
* Output shards are split into N contiguous ranges of about equal bytes (`split_shards`). A
  process reads the stream groups holding tensors of its shards and writes only its shards into
  the shared work folder; a group straddling two processes' shards is read by both.
* Norm groups inside one stream group (layer/tensor granularity) are reduced by the process that
  reads that group, with the same arithmetic as one process. The paper's whole-model λ (pass 1)
  is split by stream groups; the per-tensor squared norms are gathered and every process adds
  them in plan order: float64 sums bit for bit equal to one process's (an all-reduce of partial
  sums would add in another order).
* At the end the norms and statistics are gathered; the main process writes the index,
  coefficients, recipe and card, publishes (atomic rename) and pushes. The output is byte for
  byte the one a single process writes.

The work folder must be visible to every process (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import MergeError

if TYPE_CHECKING:
    from .ledger import NormLedger
    from .plan import MergePlan
    from .stats import StreamStats

# Processes wait for the slowest one at a few points (the end of pass 1, before publishing); the
# default 30-minute limit of torch.distributed could end a large merge on slow disks.
TIMEOUT = timedelta(hours=24)



def launched_processes() -> int:
    """Processes of this job as the launcher (torchrun, accelerate launch) set them; 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process prints (rank 0, or the only process); needs no process group."""
    return os.environ.get("RANK", "0") in ("", "0")


class World:
    """This process's place among the launched ones, and the few collectives a merge needs."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.index: int = state.process_index
        self.count: int = state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def broadcast(self, obj: Any = None) -> Any:
        """The main process's `obj` on every process (others pass nothing)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in process order, on every process."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.count
        dist.all_gather_object(out, obj)
        return out


def connect(device: str) -> World | None:
    """The launched process group, or None when this is the only process (the usual case).

    On CPU (`--device cpu`, or no GPU) accelerate is asked for its CPU backend (gloo); it is the
    first to build accelerate's shared state, so `select_device` then returns this process's device.
    """
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=TIMEOUT)
    if state.num_processes <= 1:
        raise MergeError(
            f"Launched as {launched_processes()} processes, but accelerate's state was set up for one.",
            hint="Let hf-metagpt set up accelerate (do not create a PartialState before the merge), "
                 "or launch one process.")
    return World(state)


def disconnect() -> None:
    """Close the process group `connect` opened (the CLI, at its end): a gloo group left to the
    interpreter's exit can abort the process ("terminate called without an active exception")."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def split_shards(sizes: list[int], n: int) -> list[int]:
    """Owner of each shard: N contiguous ranges of about equal bytes (by where each shard starts;
    fewer shards than processes leave the last processes idle: --max-shard-size makes more)."""
    total = sum(sizes) or 1
    owners, before = [], 0
    for size in sizes:
        owners.append(min(n - 1, before * n // total))
        before += size
    return owners


@dataclass
class Share:
    """What one process merges: the shards it writes (pass 1: the groups whose first shard it writes, see `schedule`)."""

    world: World
    owners: list[int]  # shard k is written by process owners[k]
    shards: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.shards = {k for k, p in enumerate(self.owners) if p == self.world.index}

    @classmethod
    def of(cls, world: World, plan: "MergePlan") -> "Share":
        return cls(world, split_shards([s.nbytes for s in plan.shards], world.count))

    @property
    def index(self) -> int:
        return self.world.index

    @property
    def count(self) -> int:
        return self.world.count

    def gather(self, obj: Any) -> list[Any]:
        return self.world.gather(obj)

    def share_results(self, ledger: "NormLedger", stats: "StreamStats") -> None:
        """Every process's norms, Gram matrices and statistics into this one's (a merge's end).

        The norms of a group are the same whoever reduced it; the caller recomputes coefficients
        in plan order, the order (and values) one process records them in.
        """
        mine = {"sq": {g: ledger.sums[g] for g in ledger.complete if g in ledger.sums},
                "grams": [list(e) for e in ledger.grams if e[0] in ledger.complete],
                "stats": (stats.bytes_read, stats.bytes_written, stats.shards_reused, stats.passes)}
        parts = self.gather(mine)
        for part in parts:
            for g, values in part["sq"].items():
                if not ledger.is_complete(g):
                    ledger.load({g: values})
        for part in parts:  # the Gram matrices of groups another process reduced
            ledger.load_grams(tuple(e) for e in part["grams"])
        stats.bytes_read, stats.bytes_written, stats.shards_reused = (sum(p["stats"][i] for p in parts)
                                                                      for i in range(3))
        stats.passes = max(p["stats"][3] for p in parts)


def check_supported(output_format: str, low_disk: bool) -> None:
    """What a multi-process merge refuses (with the way out)."""
    if output_format == "lora":
        raise MergeError("--output-format lora writes one adapter file: it runs in one process.",
                         hint="Run it without accelerate launch / --num-processes.")
    if low_disk:
        raise MergeError("--low-disk fetches and deletes shards per process: it runs in one process.",
                         hint="Drop --low-disk (the main process downloads once, the others read the Hub "
                              "cache), or run in one process.")
