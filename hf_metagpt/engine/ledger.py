"""The norm ledger: squared task-vector norms per norm group, as values, keyed by what they depend on.

MetaGPT's λ of a group is a function of Σ‖τt‖² over its tensors, so the ledger is the merge's
only state besides the shards: a resumed run needs the norms of every group whose shards it keeps,
and a rerun of a finished merge can skip pass 1. Each entry is the sum, in plan order, of the
per-tensor (or per-slab) squared norms the kernels return: the same float64 additions in the same
order whichever run, thread or process reduced them, so λ reproduce bit for bit.

Beside the sums it keeps each record's Gram matrix τi·τj (tensor by tensor, in the order added;
the sums are their diagonals): what `inspect`, the card and the overlap warnings read.

The ledger is saved atomically (write, fsync, rename) and a saved ledger is read back only when
its key matches: the key names every input (commit SHA or file identity), the method and its
parameters, the seed, the granularity, the tokenizer source, `allow_nonfinite` and the device type
of seeded methods (CPU and CUDA generators draw different DARE masks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

#: A run's progress file in the work folder: the ledger and the finished shards' CRCs, saved by
#: the shard writer before each shard is renamed (one per process of a shared merge:
#: `progress.partial.K.json`; any process's entries count, norms do not depend on who reduced them).
PROGRESS_FILE = "progress.partial.json"
PROGRESS_FILES = "progress.partial*.json"


def digest(obj: Any) -> str:
    """A stable sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class NormTable:
    """A frozen view of the ledger: squared norms of the complete groups, in plan order."""

    sq: Mapping[str, tuple[float, ...]]

    def __getitem__(self, group: str) -> tuple[float, ...]:
        return self.sq[group]

    def __contains__(self, group: object) -> bool:
        return group in self.sq

    def as_lists(self) -> dict[str, list[float]]:
        return {g: list(v) for g, v in self.sq.items()}


@dataclass
class NormLedger:
    """Running sums of ‖τt‖² per norm group, and which groups are complete.

    Owned by the thread that walks the schedule: kernels return (group, values) records and
    the executor adds them here in plan order.
    """

    n_models: int
    key: str = ""
    sums: dict[str, list[float]] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)
    #: (norm group, tensor, Gram matrix) of every record added, in order (several per tensor in slabs)
    grams: list[tuple[str, str, list[list[float]]]] = field(default_factory=list)

    def add(self, group: str, values: Iterable[float]) -> None:
        acc = self.sums.setdefault(group, [0.0] * self.n_models)
        for i, v in enumerate(values):
            acc[i] += v

    def add_records(self, records: Iterable[tuple[str, str, list[list[float]]]]) -> None:
        """Add each record's squared norms (its Gram matrix's diagonal) to its group, and keep the matrix."""
        for group, tensor, gram in records:
            self.add(group, [gram[i][i] for i in range(len(gram))])
            self.grams.append((group, tensor, gram))

    def tensor_grams(self, groups: Iterable[str] | None = None) -> list[tuple[str, list[list[float]]]]:
        """(tensor, Gram matrix) entries of complete groups (`groups`: these, in this order; default all, as added)."""
        if groups is None:
            return [(t, g) for grp, t, g in self.grams if grp in self.complete]
        by_group: dict[str, list[tuple[str, list[list[float]]]]] = {}
        for grp, t, g in self.grams:
            by_group.setdefault(grp, []).append((t, g))
        return [e for grp in groups if grp in self.complete for e in by_group.get(grp, [])]

    def load_grams(self, entries: Iterable[tuple[str, str, list[list[float]]]]) -> None:
        """Gram matrices of complete groups from a cache (their sums come with `load`)."""
        have = {grp for grp, _, _ in self.grams}
        self.grams.extend((grp, t, g) for grp, t, g in entries if grp in self.complete and grp not in have)

    def finish(self, groups: Iterable[str]) -> None:
        """Mark groups complete (every tensor of theirs has been added)."""
        self.complete.update(groups)

    def finish_all(self) -> None:
        self.complete.update(self.sums)

    def is_complete(self, group: str) -> bool:
        return group in self.complete

    def sq(self, group: str) -> list[float]:
        """The group's squared norms (zeros for a group with no floating tensor reduced)."""
        return list(self.sums.get(group, [0.0] * self.n_models))

    def known(self, groups: Iterable[str]) -> bool:
        return all(g in self.complete for g in groups)

    def load(self, sq: Mapping[str, Iterable[float]]) -> None:
        """Take complete groups from a cache (a finished output or a saved ledger of the same key)."""
        for g, v in sq.items():
            self.sums[g] = [float(x) for x in v]
            self.complete.add(g)

    def table(self, order: Iterable[str] | None = None) -> NormTable:
        """The complete groups as a frozen value (in `order` when given)."""
        groups = [g for g in order if g in self.complete] if order is not None else sorted(self.complete)
        return NormTable(MappingProxyType({g: tuple(self.sums.get(g, [0.0] * self.n_models)) for g in groups}))

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """What `save` writes: the key and the complete groups only (a partial sum is never reused)."""
        return {"key": self.key, "sq_norms": {g: self.sums[g] for g in sorted(self.complete) if g in self.sums},
                "grams": [[grp, t, g] for grp, t, g in self.grams if grp in self.complete]}

    def load_saved(self, work_dir: Path) -> None:
        """Complete groups of every saved ledger of this key in the work folder (any process's)."""
        for path in sorted(work_dir.glob(PROGRESS_FILES)):
            try:
                state = json.loads(path.read_text())
                if state.get("key") != self.key:
                    continue
                sq = {str(k): [float(x) for x in v] for k, v in state["sq_norms"].items()}
                grams = [(str(grp), str(t), [[float(x) for x in row] for row in g])
                         for grp, t, g in state.get("grams", [])]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if all(len(v) == self.n_models for v in sq.values()) and valid_norms(sq):
                self.load(sq)
                self.load_grams(grams)


def valid_norms(sq: Mapping[str, Iterable[float]]) -> bool:
    """Squared norms are finite and never negative: anything else did not come from a merge."""
    return all(math.isfinite(x) and x >= 0.0 for v in sq.values() for x in v)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            # dumps, not dump: only `dumps` uses the C encoder; `dump` encodes in Python, holding
            # the GIL (most of the writer thread's hold once its copies were gone, 1.1B merge)
            f.write(json.dumps(obj))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise
