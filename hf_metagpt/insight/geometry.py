"""Task-vector geometry as values: Gram matrices per group, shares, cosines, λ, and the overlap rule.

The engine hands over one Gram matrix (τi·τj, float64) per tensor it reduced, in the order it
added them to its norm groups; everything a user is shown is derived here from those entries:

- groups at each granularity (METHOD.md's grouping, `plan.norm_group_of`), summed in entry order,
  so a group's diagonal is bit for bit the squared norms the engine sums for the same group;
- each model's share of a group's squared norm — which is MetaGPT's λ for that group;
- cosines cos_ij = G_ij / √(G_ii·G_jj), 0 where a norm is 0 (never NaN);
- where each model changed the base: the fraction of its ‖τt‖² that falls in each group;
- the overlap rule (`overlaps`, `overlap_warnings`), documented on `COSINE_LIMIT`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..methods.metagpt import metagpt_lambdas
from ..engine.plan import norm_group_of

GRANULARITIES = ("model", "layer", "tensor")

#: The overlap rule. A pair of fine-tunes (i, j) overlaps in a group when
#:
#:   |cos_ij| > COSINE_LIMIT   and   (G_ii + G_jj in the group) ≥ SHARE_LIMIT · (‖τi‖² + ‖τj‖² overall)
#:
#: checked over the whole model (share 1) and over each group of METHOD.md's layer grouping (each
#: block, and each tensor outside the blocks). Why these numbers: two unrelated directions in a
#: space of millions of dimensions have |cos| ≈ 1/√n, far below 0.3, and fine-tunes of one base
#: measured 0.01–0.11 over the whole model; at 0.3 the cross term τi·τj is 30 % of the geometric
#: mean of the two norms, large enough to move the merged update visibly. The share condition
#: keeps tiny tensors out (final norms measured cos 0.86–0.96 while holding a negligible part of
#: ‖τ‖²): overlap there cannot change the merge much. It is the pair's own squared norm that
#: counts, so two small fine-tunes overlapping beside one large one are still reported.
COSINE_LIMIT = 0.3
SHARE_LIMIT = 0.10
#: groups named per pair in a warning (the largest shares first).
NAMED_GROUPS = 3


@dataclass(frozen=True)
class Gram:
    """G[i, j] = τi·τj over one group of parameters, for T task vectors (float64 values)."""

    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if any(len(row) != len(self.values) for row in self.values):
            raise ValueError(f"a Gram matrix must be square, got rows of {[len(r) for r in self.values]}")

    @classmethod
    def of(cls, matrix: Any) -> "Gram":
        """From a T×T torch tensor, numpy array or nested sequence."""
        rows = matrix.tolist() if hasattr(matrix, "tolist") else matrix
        return cls(tuple(tuple(float(x) for x in row) for row in rows))

    @classmethod
    def zeros(cls, n: int) -> "Gram":
        return cls(tuple((0.0,) * n for _ in range(n)))

    def __add__(self, other: "Gram") -> "Gram":
        if other.n != self.n:
            raise ValueError(f"cannot add Gram matrices of {self.n} and {other.n} models")
        return Gram(tuple(tuple(a + b for a, b in zip(r, s)) for r, s in zip(self.values, other.values)))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def sq_norms(self) -> tuple[float, ...]:
        """‖τt‖² of each model over the group (the diagonal)."""
        return tuple(self.values[i][i] for i in range(self.n))

    @property
    def total(self) -> float:
        return float(sum(self.sq_norms))

    @property
    def shares(self) -> tuple[float, ...]:
        """Each model's share of the group's squared norm: MetaGPT's λ for this group (0 if all are 0)."""
        return tuple(metagpt_lambdas(self.sq_norms))

    def cosine(self, i: int, j: int) -> float:
        """cos(τi, τj) over the group; 0 when either norm is 0 (1 on the diagonal otherwise)."""
        gi, gj = self.values[i][i], self.values[j][j]
        if gi <= 0.0 or gj <= 0.0:
            return 0.0
        if i == j:
            return 1.0
        # Rounding can put |cos| a hair above 1 for (anti)parallel vectors.
        return max(-1.0, min(1.0, self.values[i][j] / math.sqrt(gi * gj)))

    @property
    def cosines(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(self.cosine(i, j) for j in range(self.n)) for i in range(self.n))

    def combined_sq_norm(self, weights: Sequence[float]) -> float:
        """‖Σt wt·τt‖² = wᵀ·G·w over the group: the size of the merged update."""
        return float(sum(wi * wj * self.values[i][j] for i, wi in enumerate(weights) for j, wj in enumerate(weights)))

    def cross_term_share(self, weights: Sequence[float]) -> float:
        """The part of ‖Σ wt·τt‖² that comes from τi·τj (i ≠ j): 0 for orthogonal task vectors.

        What MetaGPT's derivation drops; negative when task vectors conflict. 0 for a zero update.
        """
        full = self.combined_sq_norm(weights)
        if full == 0.0:
            return 0.0
        diag = sum(w * w * g for w, g in zip(weights, self.sq_norms))
        return (full - diag) / full


def group_grams(entries: Iterable[tuple[str, Gram]], granularity: str) -> dict[str, Gram]:
    """Sum per-tensor Gram matrices into the groups of `granularity`, in entry order.

    Entries are (tensor name, Gram) in the order the engine reduced them; a tensor may come more
    than once (row slabs). Summing in that order reproduces the engine's group norms exactly.
    Groups keep the order of their first entry.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r} (one of {', '.join(GRANULARITIES)})")
    out: dict[str, Gram] = {}
    for name, gram in entries:
        g = norm_group_of(name, granularity)
        out[g] = gram if g not in out else out[g] + gram
    return out


@dataclass(frozen=True)
class Overlap:
    """Fine-tunes i and j overlap in `group`: |cosine| above the limit where their norms are."""

    i: int
    j: int
    group: str  # "model" for the whole model, else a layer group
    cosine: float
    share: float  # the group's part of ‖τi‖² + ‖τj‖² over the whole model

    def to_json(self, models: Sequence[str]) -> dict[str, Any]:
        return {"models": [models[self.i], models[self.j]], "group": self.group,
                "cosine": self.cosine, "share": self.share}


@dataclass(frozen=True)
class Geometry:
    """The task vectors' Gram matrices for one set of inputs, per tensor, with every view derived.

    Args:
        models: the fine-tunes' display names, in merge order.
        entries: (tensor name, Gram) in the order the engine reduced them.
    """

    models: tuple[str, ...]
    entries: tuple[tuple[str, Gram], ...]
    #: `group_grams` per granularity, summed once: a card asks for the layer groups about 18 times
    #: (overlaps, fractions, each picture), 45 ms of CPU on a 1.1B model before this cache
    _grouped: dict[str, dict[str, Gram]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bad = [name for name, g in self.entries if g.n != len(self.models)]
        if bad:
            raise ValueError(f"{bad[0]}: a Gram matrix of the wrong size for {len(self.models)} models")

    @classmethod
    def from_tensors(cls, models: Sequence[str], entries: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> "Geometry":
        """From tensor name → T×T matrix (torch, numpy, nested lists or `Gram`), in order."""
        items = entries.items() if isinstance(entries, Mapping) else entries
        return cls(tuple(models), tuple((n, g if isinstance(g, Gram) else Gram.of(g)) for n, g in items))

    def to_json(self) -> dict[str, Any]:
        """Every entry, exactly (floats round-trip through JSON): what a cache or coefficients file keeps."""
        return {"models": list(self.models), "tensors": [[n, [list(r) for r in g.values]] for n, g in self.entries]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Geometry":
        """The inverse of `to_json`; ValueError on a malformed object."""
        try:
            return cls.from_tensors([str(m) for m in data["models"]], [(str(n), g) for n, g in data["tensors"]])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a stored geometry ({exc})") from None

    def groups(self, granularity: str) -> dict[str, Gram]:
        """Gram matrix of every group at `granularity` (METHOD.md's grouping)."""
        out = self._grouped.get(granularity)
        if out is None:
            out = group_grams(self.entries, granularity)
            if granularity == "model" and not out:
                out = {"model": Gram.zeros(len(self.models))}
            self._grouped[granularity] = out
        return dict(out)

    @property
    def whole(self) -> Gram:
        """The whole model (the paper's group)."""
        return self.groups("model")["model"]

    @property
    def layers(self) -> dict[str, Gram]:
        """Each block (`layers.N`) and each tensor outside the blocks."""
        return self.groups("layer")

    def lambdas(self, granularity: str) -> dict[str, list[float]]:
        """The MetaGPT λ each group of `granularity` would give (zero group → all 0)."""
        return {g: list(gram.shares) for g, gram in self.groups(granularity).items()}

    def fractions(self, granularity: str = "layer") -> dict[str, list[float]]:
        """Where each model changed the base: the part of its ‖τt‖² in each group (sums to 1 over groups).

        A model equal to the base gets 0 everywhere.
        """
        whole = self.whole.sq_norms
        return {g: [x / w if w > 0.0 else 0.0 for x, w in zip(gram.sq_norms, whole)]
                for g, gram in self.groups(granularity).items()}

    def overlaps(self, *, cosine: float = COSINE_LIMIT, share: float = SHARE_LIMIT) -> list[Overlap]:
        """Every (pair, group) the overlap rule flags: the whole model first, then layer groups in order."""
        whole = self.whole
        found: list[Overlap] = []
        t = len(self.models)
        for g, gram in [("model", whole), *self.layers.items()]:
            for i in range(t):
                for j in range(i + 1, t):
                    denom = whole.values[i][i] + whole.values[j][j]
                    part = 1.0 if g == "model" else ((gram.values[i][i] + gram.values[j][j]) / denom if denom > 0 else 0.0)
                    c = gram.cosine(i, j)
                    if abs(c) > cosine and part >= share:
                        found.append(Overlap(i, j, g, c, part))
        return found


def _where(o: Overlap) -> str:
    if o.group == "model":
        return f"over the whole model (cos {o.cosine:+.2f})"
    return f"{o.group} (cos {o.cosine:+.2f}, {o.share:.0%} of their ‖τ‖²)"


def overlap_warnings(geometry: Geometry, *, granularity: str = "model", cosine: float = COSINE_LIMIT,
                     share: float = SHARE_LIMIT, flagged: Sequence[Overlap] | None = None) -> list[str]:
    """One warning per overlapping pair: which models and layers, what MetaGPT assumes, what to try.

    Args:
        geometry: the inputs' task-vector geometry.
        granularity: the merge's granularity (what to suggest depends on it).
        cosine, share: the rule's limits (see `COSINE_LIMIT`).
        flagged: the overlaps, when already computed.
    """
    flagged = list(geometry.overlaps(cosine=cosine, share=share) if flagged is None else flagged)
    by_pair: dict[tuple[int, int], list[Overlap]] = {}
    for o in flagged:
        by_pair.setdefault((o.i, o.j), []).append(o)
    out = []
    for (i, j), found in by_pair.items():
        whole = [o for o in found if o.group == "model"]
        parts = sorted((o for o in found if o.group != "model"), key=lambda o: -o.share)
        where = [_where(o) for o in whole] + [("in " if k == 0 else "") + _where(o) for k, o in enumerate(parts[:NAMED_GROUPS])]
        if len(parts) > NAMED_GROUPS:
            where.append(f"and {len(parts) - NAMED_GROUPS} more group(s)")
        signs = {o.cosine > 0 for o in found}
        same = "both push the same direction, and the merge applies it with the sum of their λ, more than either λ suggests"
        against = "they pull against each other and partly cancel in the merge"
        effect = (f"there {same}" if signs == {True} else f"there {against}" if signs == {False}
                  else f"where the cosine is positive {same}; where it is negative {against}")
        a, b = geometry.models[i], geometry.models[j]
        tries = ("try --granularity layer (a λ per block, so an overlap only weighs on its own blocks) and "
                 if granularity == "model" else "try ")
        out.append(
            f"{a} and {b} overlap " + ", ".join(where) + ": MetaGPT's λ assume task vectors are orthogonal "
            "(τi·τj ≈ 0) and ignore this; " + effect + ". " + tries[0].upper() + tries[1:]
            + "`hf-metagpt compare` to check the merge against methods that resolve conflicts (ties, dare_ties) "
              f"(rule: |cos| > {cosine} where a group holds ≥ {share:.0%} of the pair's ‖τ‖²)")
    return out
