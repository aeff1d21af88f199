"""What a merge returns: coefficients, norms, statistics, warnings — and how they are shown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .engine.stats import StreamStats
from .errors import OutputError
from .options import local_name, public_recipe_text
from .sources.refs import ModelRef

if TYPE_CHECKING:
    from .engine.timeline import Timeline
    from .insight.geometry import Geometry

COEFFICIENTS_FILE = "metagpt_coefficients.json"


def short_name(ref: ModelRef) -> str:
    """An input's name where it is published (tables, cards): the Hub ID, or a local folder's name."""
    return ref.display if ref.repo_id else local_name(ref.spec)


# What a method did, as the CLI summary and the card say it (the card imports these: publish comes
# after result, never the other way).
METAGPT_METHODS = ("metagpt", "metagpt_ties", "metagpt_dare")
#: how the first sentence names the method
METHOD_LABEL = {"metagpt": "MetaGPT", "metagpt_ties": "MetaGPT + TIES", "metagpt_dare": "MetaGPT + DARE",
                "linear": "linear", "task_arithmetic": "task-arithmetic", "ties": "TIES", "dare_linear": "DARE",
                "dare_ties": "DARE-TIES", "breadcrumbs": "Model Breadcrumbs", "breadcrumbs_ties": "Model Breadcrumbs (TIES)",
                "della": "DELLA", "della_linear": "DELLA (linear)", "model_stock": "Model Stock", "sce": "SCE",
                "slerp": "SLERP", "nuslerp": "NuSLERP", "karcher": "Karcher mean",
                "arcee_fusion": "Arcee Fusion"}


def uses_lambdas(method: str) -> bool:
    """Whether a method's coefficients are MetaGPT's λ (and its granularity means something)."""
    return method in METAGPT_METHODS


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def public_parameters(result: "MergeResult") -> dict:
    """The method's parameters as a user writes them (`lambda`, not `lambda_`; unset ones left out)."""
    out = {str(k).rstrip("_"): v for k, v in result.parameters.items() if v is not None}
    if result.seed is not None:
        out["seed"] = result.seed
    return out


def method_summary(result: "MergeResult") -> list[str]:
    """What the CLI prints for a method without MetaGPT's λ: what it did, with which parameters.

    Per-model parameters (`weights`, `density` as a list, ...) as a table with a row per model,
    the models' roles where the method gives them some (SLERP's endpoints, Model Stock's anchor),
    and the method's other parameters as `name=value` (every value it used, defaults included).
    """
    names = [short_name(m) for m in result.models]
    base = short_name(result.base)
    label = METHOD_LABEL.get(result.method, result.method)
    params = public_parameters(result)
    per_model = {k: v for k, v in params.items() if isinstance(v, (list, tuple)) and len(v) == len(names)}
    lines = []
    if per_model:
        lines += ["| model | " + " | ".join(per_model) + " |", "|---|" + "---|" * len(per_model)]
        lines += [f"| {n} | " + " | ".join(value_text(v[i]) for v in per_model.values()) + " |" for i, n in enumerate(names)]
        lines.append("")
    if result.method == "slerp" and len(names) == 1:
        t = params.get("t")
        lines.append(f"{label}: along the arc from {base} (t = 0) to {names[0]} (t = 1), at t = {value_text(t)}")
    elif result.method == "model_stock":
        lines.append(f"{label}: the average of {plural(len(names), 'fine-tune')} ({', '.join(names)}) pulled back "
                     f"toward {base} (the anchor) by how much their task vectors agree, per tensor")
    else:
        lines.append(f"{label}: {', '.join(names)} on {base}")
    rest = {k: v for k, v in params.items() if k not in per_model and v is not None}
    lines.append("parameters: " + (", ".join(f"{k}={value_text(v)}" for k, v in rest.items()) or "none"))
    return lines


def value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    return str(v)


def ref_json(ref: ModelRef) -> dict[str, Any]:
    # Published with the merge: a local input by its folder name, never the merging machine's path.
    out: dict[str, Any] = {"ref": ref.pinned if ref.repo_id else local_name(ref.spec)}
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
    #: the recipe that reproduces the merge, as published (hf_metagpt_recipe.yaml and the card):
    #: made public on construction — no output, token or push target, local inputs by folder name
    recipe: str = ""
    pushed_url: str | None = None
    #: what weighted sums and norms were accumulated in ("float64" on the fused paths; the engine
    #: sets "float32" for TIES/DARE/LoRA paths, "mergekit bfloat16" for mergekit's arithmetic); the card words its precision sentence from it
    precision: str = "float64"
    #: τi·τj per tensor (float64), when the engine measured them beside the norms
    geometry: "Geometry | None" = None
    #: where this process's time went (`engine.timeline`; `HF_METAGPT_TIMELINE`, `-v`)
    timeline: "Timeline | None" = None

    def __post_init__(self) -> None:
        self.recipe = public_recipe_text(self.recipe)

    @property
    def model_lambdas(self) -> dict[str, list[float]]:
        """λ of each model (by display name) across groups, in group order."""
        return {m.display: [c[i] for c in self.coefficients.values()] for i, m in enumerate(self.models)}

    def to_json(self) -> dict[str, Any]:
        """Content of metagpt_coefficients.json (machine-readable, no secrets)."""
        out = {
            "hf_metagpt_version": __version__,
            "method": self.method,
            "parameters": self.parameters,
            "granularity": self.granularity,
            "seed": self.seed,
            "output_dtype": self.out_dtype,
            "precision": self.precision,
            "base": ref_json(self.base),
            "models": [ref_json(m) for m in self.models],
            "norms_key": self.norms_key,
            "groups": {
                g: {"lambdas": self.coefficients[g], "sq_norms": self.sq_norms.get(g)}
                for g in self.coefficients
            },
        }
        if self.geometry is not None:
            from .insight.card import relabel
            from .insight.report import geometry_json

            # Published with the merge: models named as in the card (no local path).
            geometry = relabel(self.geometry, [short_name(m) for m in self.models])
            out.update(geometry_json(geometry, out["groups"], self.granularity))
        return out

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    create_pr: bool = False, revision: str | None = None,
                    commit_message: str | None = None) -> str:
        """Upload the merged folder to the Hub as one commit; returns the URL (also in `pushed_url`).

        Args:
            repo_id: the repo to push to (`org/name`); created when missing.
            token: a Hub token with write access (default: `HF_TOKEN` or the `hf auth login` token).
            private: create the repo private (an existing repo keeps its visibility).
            create_pr: open a pull request instead of committing to the branch.
            revision: the branch to push to (created from main when missing).
            commit_message: the commit's message (default: one naming the folder).

        Returns:
            The URL of the repo, branch or pull request.

        Raises:
            OutputError: the merge wrote no folder to push.
            HubAccessError: the token may not write to `repo_id`, or the Hub refused the upload.

        Example:
            >>> result = hf_metagpt.merge(base="base/", models=["chat/", "math/"], output="merged/")
            >>> result.push_to_hub("me/merged", private=True)
            'https://huggingface.co/me/merged'
        """
        from .publish.push import push

        if self.output is None or not Path(self.output).is_dir():
            raise OutputError(f"Nothing to push: the merge's output folder {self.output} does not exist.",
                              hint="Merge with --output DIR (output=...) first, or push that folder with "
                                   "`hf-metagpt push DIR ORG/NAME`.")
        self.pushed_url = push(self.output, repo_id, token=token, private=private, create_pr=create_pr,
                               revision=revision, commit_message=commit_message)
        return self.pushed_url

    def write_coefficients(self, folder: Path) -> Path:
        path = folder / COEFFICIENTS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2))
        if self.geometry is not None:  # every Gram matrix, compactly (the JSON keeps them for few models)
            from .insight.card import GRAM_FILE, relabel
            from .insight.report import write_gram

            write_gram(relabel(self.geometry, [short_name(m) for m in self.models]), folder / GRAM_FILE)
        return path

    def lambda_table(self, max_rows: int | None = None, *, public: bool = False) -> str:
        """Markdown table: one row per group, one column per model (`public`: local inputs by folder name)."""
        names = [short_name(m) if public else m.display for m in self.models]
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
        # λ mean something for MetaGPT's methods only; any other method says what it did instead
        lines = [self.lambda_table(max_rows=24) if uses_lambdas(self.method) else "\n".join(method_summary(self)), ""]
        where = f" -> {self.output}" if self.output else ""
        grain = f" (granularity {self.granularity})" if uses_lambdas(self.method) else ""
        lines.append(f"Merged {len(self.models)} model(s) into {self.base.display} with {self.method}{grain}{where}")
        secs = max(s.seconds, 1e-9)
        where = (f" on {s.device} ({s.workers} compute thread(s), {s.readers} reader(s))" if s.device else "")
        lines.append(
            f"time {s.seconds:.1f} s{where}, read {s.bytes_read / 1e9:.3f} GB in {s.passes} pass(es) "
            f"({s.bytes_read / 1e9 / secs:.2f} GB/s), wrote {s.bytes_written / 1e9:.3f} GB "
            f"({s.bytes_written / 1e9 / secs:.2f} GB/s), peak memory {self.peak_rss / 1e9:.2f} GB"
            + (f", {s.shards_reused} shard(s) reused" if s.shards_reused else "")
        )
        if self.precision.startswith("mergekit "):
            lines.append(f"Arithmetic: mergekit's, in {self.precision.split(' ', 1)[1]} "
                         "(--arithmetic own: hf-metagpt's float64 sums)")
        if self.pushed_url:
            lines.append(f"Pushed: {self.pushed_url}")
        return "\n".join(lines)
