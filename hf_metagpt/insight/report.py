"""What `inspect` returns and shows: a typed result, its JSON object, and its text table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .geometry import COSINE_LIMIT, GRANULARITIES, SHARE_LIMIT, Geometry, Gram, overlap_warnings

#: `inspect --json`'s layout version (bump when a key changes meaning).
SCHEMA = 1


def gram_json(gram: Gram, *, fractions: Sequence[float] | None = None) -> dict[str, Any]:
    """One group: squared norms, shares (= MetaGPT λ of the group), cosines, the raw Gram matrix."""
    out: dict[str, Any] = {
        "sq_norms": list(gram.sq_norms),
        "shares": list(gram.shares),
        "cosine": [list(r) for r in gram.cosines],
        "gram": [list(r) for r in gram.values],
    }
    if fractions is not None:
        out["fraction_of_model"] = list(fractions)
    return out


def inspect_json(geometry: Geometry, *, base: str | None = None, warnings: Sequence[str] = (),
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `inspect --json` object.

    `{"models": [...], "model": {"sq_norms", "cosine", ...}, "groups": {"layers.N" or tensor name:
    {"sq_norms", "cosine", ...}}, "lambdas": {granularity: {group: [λ per model]}}, "overlaps":
    [...], "rule": {...}, "warnings": [...]}`. Groups are METHOD.md's layer grouping (each block,
    each tensor outside the blocks), in plan order; every number is a float (float64 sums).
    """
    whole = geometry.whole
    lam = list(whole.shares)
    fractions = geometry.fractions("layer")
    out: dict[str, Any] = {"schema": SCHEMA}
    if base is not None:
        out["base"] = base
    out["models"] = list(geometry.models)
    out["model"] = {**gram_json(whole), "merged_sq_norm": whole.combined_sq_norm(lam),
                    "cross_term_share": whole.cross_term_share(lam)}
    out["groups"] = {g: gram_json(gram, fractions=fractions[g]) for g, gram in geometry.layers.items()}
    out["lambdas"] = {gr: geometry.lambdas(gr) for gr in GRANULARITIES}
    out["overlaps"] = [o.to_json(geometry.models) for o in geometry.overlaps()]
    out["rule"] = {"cosine": COSINE_LIMIT, "share": SHARE_LIMIT,
                   "text": "a pair overlaps in a group when |cos| > cosine and the group holds at least "
                           "`share` of the pair's squared norm (the whole model always counts)"}
    out["warnings"] = list(warnings)
    if extra:
        out.update(extra)
    return out


#: up to this many models the coefficients file also holds every per-tensor Gram matrix and each group's
#: (T² numbers each); past it they are in GRAM_FILE only, and the JSON keeps the whole model's
JSON_GRAM_MODELS = 12


def geometry_json(geometry: Geometry, groups: dict[str, dict[str, Any]], granularity: str) -> dict[str, Any]:
    """What `metagpt_coefficients.json` gains from a measured geometry.

    Each merge group (`groups`, updated in place) gets its Gram matrix and cosines; the returned
    "geometry" key holds every per-tensor entry exactly, the whole model and the overlaps the rule
    flags. Past JSON_GRAM_MODELS models (the file grows with T²) the per-tensor entries and the
    per-group matrices are left to `write_gram` (every entry, float64, one file) and the JSON names it.
    """
    from .card import GRAM_FILE

    small = len(geometry.models) <= JSON_GRAM_MODELS
    for g, gram in geometry.groups(granularity).items():
        if g in groups and (small or g == "model"):
            groups[g]["gram"] = [list(r) for r in gram.values]
            if small:
                groups[g]["cosine"] = [list(r) for r in gram.cosines]
    stored = geometry.to_json() if small else {"models": list(geometry.models), "tensors_file": GRAM_FILE}
    whole = gram_json(geometry.whole)
    if not small:  # its Gram matrix is the "model" group's, and the file's
        whole = {k: v for k, v in whole.items() if k not in ("gram", "cosine")}
    return {"geometry": {**stored, "model": whole,
                         "overlaps": [o.to_json(geometry.models) for o in geometry.overlaps()]}}


def write_gram(geometry: Geometry, path: str | Path) -> Path:
    """Every per-tensor Gram matrix τi·τj, float64, as one NumPy array [E, T, T] in the engine's order
    (`.npy`: no pickle, and no `*.safetensors` a loader could take for a weight shard); the entry names and
    the models go into a small JSON beside it (`PATH.json`). `read_gram` reads both back exactly."""
    import numpy as np

    path = Path(path)
    t = len(geometry.models)
    stacked = np.array([list(g.values) for _, g in geometry.entries], dtype=np.float64).reshape(-1, t, t)
    with open(path, "wb") as fh:
        np.save(fh, stacked, allow_pickle=False)
    path.with_name(path.name + ".json").write_text(json.dumps(
        {"format": "hf-metagpt gram", "models": list(geometry.models), "names": [n for n, _ in geometry.entries]}))
    return path


def read_gram(path: str | Path) -> Geometry:
    """The geometry `write_gram` saved, exactly."""
    import numpy as np

    path = Path(path)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    grams = np.load(path, allow_pickle=False)
    return Geometry.from_tensors(meta["models"], list(zip(meta["names"], grams.tolist())))


def _num(x: float) -> str:
    return f"{x:.3e}" if x else "0"


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


#: up to this many models the text table has a column per model and per pair (6 pairs at 4)
WIDE_MODELS = 4
#: pairs listed by |cos| when the table has too many models for a column per pair
TOP_PAIRS = 10


def _many_models_table(geometry: Geometry, *, max_rows: int | None = None) -> str:
    """The text table for many models: its width does not grow with the number of models.

    Per model (whole model): ‖τ‖², λ, and the model it is most aligned with; per group: Σ‖τ‖², the
    largest λ and whose, the largest |cos| and its pair, the mean |cos| over every pair; then the
    `TOP_PAIRS` pairs of largest |cos| over the whole model, and each granularity's λ range.
    """
    t = len(geometry.models)
    pairs = _pairs(t)
    whole = geometry.whole

    def table(head: list[str], rows: list[list[str] | None], last: list[str] | None = None,
              left: int = 2) -> list[str]:
        full = [r for r in rows if r is not None] + ([last] if last else [])
        widths = [max(len(r[c]) for r in [head, *full]) for c in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(r[c].ljust(widths[c]) if c < left else r[c].rjust(widths[c]) for c in range(len(r))).rstrip()

        out = [fmt(head), fmt(["-" * w for w in widths])]
        out += ["…" if r is None else fmt(r) for r in rows]
        if last:
            out += [fmt(["-" * w for w in widths]), fmt(last)]
        return out

    def most_aligned(gram: Gram, k: int) -> tuple[float, int]:
        return max(((gram.cosine(k, j), j) for j in range(t) if j != k), key=lambda c: abs(c[0]))

    lines = [f"{t} models, {len(pairs)} pairs: a row per model, a summary row per group, the {TOP_PAIRS} most "
             "aligned pairs", ""]
    model_rows: list[list[str] | None] = []
    for k, name in enumerate(geometry.models):
        cos, j = most_aligned(whole, k)
        model_rows.append([f"[{k + 1}]", name, _num(whole.sq_norms[k]), f"{whole.shares[k]:.4f}", f"{cos:+.3f}",
                           f"[{j + 1}]"])
    lines += table(["#", "model (whole model)", "‖τ‖²", "λ", "max |cos|", "with"], model_rows)

    def group_row(name: str, gram: Gram) -> list[str]:
        shares = gram.shares
        top = max(range(t), key=lambda k: shares[k])
        cosines = [(gram.cosine(i, j), i, j) for i, j in pairs]
        cos, i, j = max(cosines, key=lambda c: abs(c[0]))
        mean = sum(abs(c[0]) for c in cosines) / len(cosines)
        return [name, _num(gram.total), f"{shares[top]:.4f}", f"[{top + 1}]", f"{cos:+.3f}", f"[{i + 1}]·[{j + 1}]",
                f"{mean:.3f}"]

    groups = list(geometry.layers.items())
    shown: list[tuple[str, Gram] | None] = list(groups)
    if max_rows is not None and len(groups) > max_rows:
        keep = max(1, max_rows - 1)
        head_n = keep // 2 + keep % 2
        shown = groups[:head_n] + [None] + groups[len(groups) - (keep - head_n):]
    lines += [""] + table(["group", "Σ‖τ‖²", "max λ", "of", "max |cos|", "pair", "mean |cos|"],
                          [None if g is None else group_row(*g) for g in shown], group_row("whole model", whole), left=1)
    top = sorted(pairs, key=lambda p: -abs(whole.cosine(*p)))[:TOP_PAIRS]
    lines += ["", f"the {len(top)} pairs of largest |cos| over the whole model (of {len(pairs)}):"]
    lines += [f"  [{i + 1}]·[{j + 1}]  {whole.cosine(i, j):+.3f}  {geometry.models[i]} · {geometry.models[j]}"
              for i, j in top]
    lines += ["", "λ each granularity would give (min … max over models and groups):"]
    for gr in GRANULARITIES:
        lam = geometry.lambdas(gr)
        cells = [(v[k], k) for v in lam.values() for k in range(t)]
        (lo, klo), (hi, khi) = min(cells), max(cells)
        lines.append(f"  {gr:<6} ({len(lam)} group(s)): {lo:.4f} ([{klo + 1}]) … {hi:.4f} ([{khi + 1}])")
    return "\n".join(lines)


def text_table(geometry: Geometry, *, max_rows: int | None = None) -> str:
    """Per group and for the whole model: ‖τt‖², λ (each model's share) and pairwise cosines.

    Models are numbered [1]..[T] in the header so the columns stay narrow; `max_rows` keeps the
    first and last groups of a long model. Past `WIDE_MODELS` models (a column per pair would make
    4,950 columns at 100 models) the table is `_many_models_table`: a row per model, a summary row
    per group and the `TOP_PAIRS` most aligned pairs.
    """
    t = len(geometry.models)
    if t > WIDE_MODELS:
        return _many_models_table(geometry, max_rows=max_rows)
    pairs = _pairs(t)
    head = (["group"] + [f"‖τ{k + 1}‖²" for k in range(t)] + [f"λ{k + 1}" for k in range(t)]
            + [f"cos {i + 1}·{j + 1}" for i, j in pairs])
    rows: list[list[str]] = []

    def row(name: str, gram: Gram) -> list[str]:
        return ([name] + [_num(x) for x in gram.sq_norms] + [f"{x:.4f}" for x in gram.shares]
                + [f"{gram.cosine(i, j):+.3f}" for i, j in pairs])

    groups = list(geometry.layers.items())
    if max_rows is not None and len(groups) > max_rows:
        keep = max(1, max_rows - 1)
        head_n = keep // 2 + keep % 2
        shown = groups[:head_n] + [None] + groups[len(groups) - (keep - head_n):]
    else:
        shown = list(groups)
    for item in shown:
        rows.append(["…"] * len(head) if item is None else row(*item))
    rows.append(row("whole model", geometry.whole))
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r))).rstrip()

    lines = ["models: " + "  ".join(f"[{k + 1}] {m}" for k, m in enumerate(geometry.models)), "",
             fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows[:-1]] + [fmt(["-" * w for w in widths]), fmt(rows[-1])]
    lines += ["", "λ each granularity would give (min … max over groups where a granularity has several):"]
    for gr in GRANULARITIES:
        lam = geometry.lambdas(gr)
        cells = []
        for k in range(t):
            vals = [v[k] for v in lam.values()]
            cells.append(f"[{k + 1}] {vals[0]:.4f}" if len(vals) == 1 else f"[{k + 1}] {min(vals):.4f} … {max(vals):.4f}")
        lines.append(f"  {gr:<6} ({len(lam)} group(s)): " + "   ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class InspectResult:
    """What `hf_metagpt.inspect` returns: the inputs' task-vector geometry and what it implies.

    Attributes:
        base: the base model as given (Hub inputs pinned to their commit).
        models: the fine-tunes, in order, as displayed.
        geometry: per-tensor Gram matrices and every view of them (`Geometry`).
        warnings: overlap warnings (and any planning warnings).
        seconds, bytes_read: the one streamed pass.
    """

    base: str
    models: tuple[str, ...]
    geometry: Geometry
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    bytes_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, base: str, geometry: Geometry, *, granularity: str = "model",
              warnings: Sequence[str] = (), **kwargs: Any) -> "InspectResult":
        """The result with the overlap warnings appended to `warnings`."""
        return cls(base=base, models=geometry.models, geometry=geometry,
                   warnings=tuple(warnings) + tuple(overlap_warnings(geometry, granularity=granularity)), **kwargs)

    def to_json(self) -> dict[str, Any]:
        return inspect_json(self.geometry, base=self.base, warnings=self.warnings,
                            extra={"seconds": self.seconds, "bytes_read": self.bytes_read, **self.extra})

    def table(self, max_rows: int | None = None) -> str:
        out = [f"Task vectors of {len(self.models)} model(s) on {self.base} (float64 dot products)", "",
               text_table(self.geometry, max_rows=max_rows)]
        if self.warnings:
            out += [""] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)

    def plot(self, folder: str | Path) -> dict[str, Path]:
        """Write the pictures (whole-model λ bars, per-layer shares, cosines) into `folder`; returns them by kind."""
        from .plots import draw_all

        return draw_all(self.geometry, Path(folder), bars=True)
