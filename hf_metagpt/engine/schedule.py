"""Schedule a plan: the steps a merge runs, in order — a pure function of values, no I/O.

A step reads one piece of every input (`pieces`) and either only reduces squared norms
(`reduce`) or merges and writes (`merge`). The paper's whole-model λ needs every norm before the
first tensor is written: pass 1 is reduce steps over every piece, pass 2 merge steps. One-pass
granularities (`layer`, `tensor`) reduce a norm group inside the step that merges it; a group cut
over several pieces (a large block, an embedding matrix in row slabs) is reduced by reduce steps
first, then its pieces are read again (from the page cache by then) to merge.

What decides the steps, all given as values: the plan's pieces, which norm groups are already
known (a resumed run's ledger), which shards are finished (resume) or belong to another process
(a shared merge), and the merge kernel's needs (`fused`: its norms come from the fused reduction,
never from the τ a method forms on its own).
"""

from __future__ import annotations

from collections import Counter

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .pieces import Piece
from .plan import MergePlan, TensorPlan


@dataclass(frozen=True)
class Step:
    """Read `piece`; reduce the norms of `reduce` groups (its floating tensors in them), then —
    for a merge step — merge and write `write`. After it, the groups in `finishes` are complete.
    """

    piece: Piece
    merge: bool
    reduce: frozenset[str] = frozenset()
    write: tuple[TensorPlan, ...] = ()
    finishes: frozenset[str] = frozenset()
    #: place of a pass-1 step among every process's (records of a shared pass 1 are summed in this order)
    order: int = 0

    @property
    def reduce_tensors(self) -> list[TensorPlan]:
        """The floating tensors whose norms this step adds, in plan order."""
        return [t for t in self.piece.tensors if t.floating and t.norm_group in self.reduce]


@dataclass(frozen=True)
class Schedule:
    """Pass 1 (norms only; empty unless a whole-model λ is still unknown), then the merge pass."""

    reduce_pass: tuple[Step, ...]
    merge_pass: tuple[Step, ...]
    #: 2 when norms are reduced in a pass of their own (by this process or, in a shared merge, others)
    passes: int = 1


def schedule(plan: MergePlan, pieces: Sequence[Sequence[Piece]], *, uses_norms: bool, fused: bool,
             known: frozenset[str] = frozenset(), done: frozenset[int] = frozenset(),
             owners: Sequence[int] | None = None, process: int = 0, reverse_pass_2: bool = True) -> Schedule:
    """The steps of a merge.

    Args:
        plan: the merge plan (its groups, shards and norm groups).
        pieces: the pieces of each stream group of `plan.groups`, in order (`pieces.split_group`).
        uses_norms: the method takes λ from squared norms (MetaGPT and its combinations).
        fused: the merge kernel reduces norms itself (fused and low-rank kernels); otherwise a
            norm group of one tensor is reduced from the τ the method path forms when merging it.
        known: norm groups whose norms are known already (an earlier run's ledger).
        done: shards finished by an earlier run (kept, neither read nor written).
        owners: the process writing each shard in a shared merge (None: this one writes all).
        process: this process's index in `owners`.
        reverse_pass_2: merge the last group first after a pass 1 (its pieces are the ones still
            in the page cache; shards are written at planned offsets, so the bytes are the same).
            False for providers that must be read in plan order (`--low-disk`).
    """
    skip = set(done)
    if owners is not None:
        skip |= {k for k, p in enumerate(owners) if p != process}
    complete = set(known)
    reduce_pass: list[Step] = []
    two = uses_norms and plan.two_pass and not set(plan.norm_groups) <= complete
    if two:
        reduce_pass = reduce_steps(plan, pieces, owners, process)
        complete |= set(plan.norm_groups)

    per_group: list[list[Step]] = []
    for group_pieces in pieces:
        todo = [p for p in group_pieces if any(t.shard not in skip for t in p.tensors)]
        if not todo:
            continue
        steps: list[Step] = []
        if uses_norms and len(group_pieces) > 1:
            steps += _reduce_cut_groups(group_pieces, complete)
            for s in steps:
                complete |= s.finishes
        for p in todo:
            reduce: frozenset[str] = frozenset()
            if uses_norms:
                pending = [t for t in p.tensors if t.floating and t.norm_group not in complete]
                reduce = frozenset(t.norm_group for t in pending
                                   if fused or sum(u.norm_group == t.norm_group for u in pending) > 1)
                # The method path reduces a one-tensor group from the τ it forms to merge it.
                inline = {t.norm_group for t in pending if t.norm_group not in reduce and t.shard not in skip}
                complete |= reduce | inline
            write = tuple(t for t in p.tensors if t.shard not in skip)
            steps.append(Step(p, merge=True, reduce=reduce, write=write, finishes=reduce))
        per_group.append(steps)
    if two and reverse_pass_2:
        per_group.reverse()
    return Schedule(tuple(reduce_pass), tuple(s for steps in per_group for s in steps), passes=2 if two else 1)


def reduce_steps(plan: MergePlan, pieces: Sequence[Sequence[Piece]], owners: Sequence[int] | None = None,
                 process: int = 0) -> list[Step]:
    """A pass of its own that reduces every norm group (pass 1 of a whole-model λ).

    In a shared merge a group is reduced by the writer of its first shard (which reads that group
    in pass 2 anyway, so pass 2 often finds it in the page cache); `order` numbers every
    process's steps, the order their records are summed in.
    """
    steps: list[Step] = []
    order = 0
    for group, group_pieces in zip(plan.groups, pieces):
        mine = owners is None or owners[group.tensors[0].shard] == process
        for p in group_pieces:
            floating = frozenset(t.norm_group for t in p.tensors if t.floating)
            if floating and not p.extra_rows:
                if mine:
                    steps.append(Step(p, merge=False, reduce=floating, order=order))
                order += 1
    return steps


def _reduce_cut_groups(pieces: Sequence[Piece], complete: set[str]) -> list[Step]:
    """Reduce steps for the norm groups of a stream group that are cut over several of its pieces."""
    where: dict[str, set[int]] = {}
    for k, p in enumerate(pieces):
        for t in p.tensors:
            if t.floating and t.norm_group not in complete:
                where.setdefault(t.norm_group, set()).add(k)
    cut = frozenset(g for g, ks in where.items() if len(ks) > 1)
    steps = [Step(Piece(p.group, tuple(t for t in p.tensors if t.floating and t.norm_group in cut), rows=p.rows),
                  merge=False, reduce=cut)
             for p in pieces if not p.extra_rows and any(t.floating and t.norm_group in cut for t in p.tensors)]
    if steps:
        steps[-1] = Step(steps[-1].piece, merge=False, reduce=cut, finishes=cut)
    return steps


def last_reads(steps: Sequence[Step], files_of: Callable[[Step], Iterable[tuple[int, str]]]) -> dict[int, list[tuple[int, str]]]:
    """After which step each (input, file) is read for the last time in `steps` (low-disk release).

    `files_of(step)` gives the (input index, file) pairs a step reads.
    """
    last: dict[tuple[int, str], int] = {}
    for k, step in enumerate(steps):
        for key in files_of(step):
            last[key] = k
    out: dict[int, list[tuple[int, str]]] = {}
    for key, k in last.items():
        out.setdefault(k, []).append(key)
    return out


def piece_key(piece: Piece) -> tuple:
    """What identifies a piece's bytes: its group, tensors and row slab."""
    return piece.group.name, tuple(t.name for t in piece.tensors), piece.rows


def read_once(steps: Schedule) -> frozenset[tuple]:
    """The pieces (`piece_key`) that only one step of the schedule reads, in either pass.

    A piece read again later (pass 1 then pass 2 of a whole-model λ, or a block larger than the
    unit, reduced and then merged) should come through the page cache, which serves the second read;
    one read once has no use for it (the executor reads those with O_DIRECT).
    """
    seen = Counter(piece_key(st.piece) for st in (*steps.reduce_pass, *steps.merge_pass))
    return frozenset(k for k, n in seen.items() if n == 1)
