"""What a merge returns: coefficients, norms, statistics, warnings — and how they are shown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .engine.stats import StreamStats
from .sources.refs import ModelRef

COEFFICIENTS_FILE = "metagpt_coefficients.json"


def _ref_json(ref: ModelRef) -> dict[str, Any]:
    out: dict[str, Any] = {"ref": ref.pinned}
    if ref.repo_id:
        out.update(repo_id=ref.repo_id, revision=ref.revision, sha=ref.sha)
    if ref.is_adapter:
        out["adapter"] = True  # a PEFT LoRA adapter on the base, not a full fine-tune
    return out


@dataclass
class MergeResult:
    """The outcome of `hf_metagpt.merge`: λ per group and model, norms, statistics."""

    output: Path | None
    base: ModelRef
    models: list[ModelRef]
    method: str
    parameters: dict[str, Any]
    granularity: str
    seed: int | None
    coefficients: dict[str, list[float]]
    sq_norms: dict[str, list[float]]
    stats: StreamStats
    peak_rss: int = 0
    norms_key: str = ""
    out_dtype: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recipe: str = ""
    pushed_url: str | None = None
    #: what the weighted sums accumulated in: float64 (fused and low-rank kernels) or float32 (the rest)
    precision: str = "float64"

    @property
    def model_lambdas(self) -> dict[str, list[float]]:
        """λ of each model (by display name) across groups, in group order."""
        return {m.display: [c[i] for c in self.coefficients.values()] for i, m in enumerate(self.models)}

    def to_json(self) -> dict[str, Any]:
        """Content of metagpt_coefficients.json (machine-readable, no secrets)."""
        return {
            "hf_metagpt_version": __version__,
            "method": self.method,
            "parameters": self.parameters,
            "granularity": self.granularity,
            "seed": self.seed,
            "output_dtype": self.out_dtype,
            "base": _ref_json(self.base),
            "models": [_ref_json(m) for m in self.models],
            "norms_key": self.norms_key,
            "groups": {
                g: {"lambdas": self.coefficients[g], "sq_norms": self.sq_norms.get(g)}
                for g in self.coefficients
            },
        }

    def write_coefficients(self, folder: Path) -> Path:
        path = folder / COEFFICIENTS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    def lambda_table(self, max_rows: int | None = None) -> str:
        """Markdown table: one row per group, one column per model."""
        names = [m.display for m in self.models]
        lines = ["| group | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        groups = list(self.coefficients)
        shown = groups if max_rows is None or len(groups) <= max_rows else groups[: max_rows - 1] + [groups[-1]]
        for g in shown:
            if max_rows is not None and g == groups[-1] and shown[-2:-1] and groups.index(shown[-2]) != len(groups) - 2:
                lines.append("| … | " + " | ".join("…" for _ in names) + " |")
            lines.append(f"| {g} | " + " | ".join(f"{x:.4f}" for x in self.coefficients[g]) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """What the CLI prints at the end."""
        s = self.stats
        lines = [self.lambda_table(max_rows=24), ""]
        where = f" -> {self.output}" if self.output else ""
        lines.append(
            f"Merged {len(self.models)} model(s) into {self.base.display} with {self.method} "
            f"(granularity {self.granularity}){where}"
        )
        lines.append(
            f"time {s.seconds:.1f} s, read {s.bytes_read / 1e9:.3f} GB in {s.passes} pass(es), "
            f"wrote {s.bytes_written / 1e9:.3f} GB, peak memory {self.peak_rss / 1e9:.2f} GB"
            + (f", {s.shards_reused} shard(s) reused" if s.shards_reused else "")
        )
        if self.pushed_url:
            lines.append(f"Pushed: {self.pushed_url}")
        return "\n".join(lines)
