"""Per-task loss, exact match and ALD of causal LMs on text data loaded with `datasets`.

MetaGPT minimises the average loss difference (ALD) between the merged model and each fine-tune on
that fine-tune's own task; this module measures it:

    ALD(model) = mean over tasks t of ( loss(model, t) − loss(fine-tune of t, t) )

A task is `NAME=DATASET[:split][:field]`. DATASET is a local data file (.json/.jsonl/.csv/.parquet/
.txt), a local dataset folder, or a Hub dataset ID (read through the same endpoint as models,
`HF_ENDPOINT`). A record is plain text (`text`, or the column named by `field`) — loss on every
predicted token — or a prompt/answer pair (`prompt` + `answer`, or `field` = `PROMPT,ANSWER`) —
loss on the answer tokens only, plus greedy exact match of the answer.

Example:
    >>> table = evaluate(["merged/", "chat/"], ["chat=data/chat.jsonl", "math=data/math.jsonl:test"],
    ...                  task_models={"chat": "chat/", "math": "math/"})
    >>> print(table.to_markdown())
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MergeError, TaskSpecError

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_SPLIT_PREFERENCE = ("test", "validation", "train")
_TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")



@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: a name and where its records come from."""

    name: str
    dataset: str
    split: str | None = None
    #: a text column, or "PROMPT,ANSWER" columns; None: `text`, else `prompt` + `answer`
    field: str | None = None

    @property
    def spec(self) -> str:
        out = f"{self.name}={self.dataset}"
        if self.split or self.field:
            out += f":{self.split or ''}"
        if self.field:
            out += f":{self.field}"
        return out


def parse_task(spec: str | TaskSpec) -> TaskSpec:
    """`NAME=DATASET[:split][:field]` -> TaskSpec (no I/O)."""
    if isinstance(spec, TaskSpec):
        return spec
    hint = "Use NAME=DATASET[:split][:field], e.g. math=data/math.jsonl or chat=org/dataset:test:text."
    text = str(spec).strip()
    if "=" not in text:
        raise TaskSpecError(f"Bad task spec {text!r}: no NAME= before the dataset.", hint=hint)
    name, rest = (s.strip() for s in text.split("=", 1))
    if not name or not set(name) <= _TASK_NAME_CHARS:
        raise TaskSpecError(f"Bad task name {name!r} in {text!r}: use letters, digits, '_', '-' or '.'.",
                            hint=hint)
    parts = rest.split(":")
    if len(parts) > 3:
        raise TaskSpecError(f"Bad task spec {text!r}: more than DATASET:split:field.", hint=hint)
    dataset = parts[0].strip()
    if not dataset:
        raise TaskSpecError(f"Bad task spec {text!r}: no dataset after {name}=.", hint=hint)
    split = parts[1].strip() if len(parts) > 1 and parts[1].strip() else None
    fld = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    if fld is not None and (fld.count(",") > 1 or any(not c.strip() for c in fld.split(","))):
        raise TaskSpecError(f"Bad field {fld!r} in {text!r}: give one text column or PROMPT,ANSWER.", hint=hint)
    return TaskSpec(name=name, dataset=dataset, split=split, field=fld)


@dataclass
class TaskData:
    """The records of one task, ready to tokenize: texts, or prompts with answers."""

    spec: TaskSpec
    texts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    split: str = ""

    @property
    def is_prompt_answer(self) -> bool:
        return bool(self.answers)

    def __len__(self) -> int:
        return len(self.answers) if self.is_prompt_answer else len(self.texts)


def load_task(spec: str | TaskSpec, max_samples: int | None = None) -> TaskData:
    """Load a task's records with `datasets` (the first `max_samples` of its split)."""
    spec = parse_task(spec)
    split, ds = _load_split(spec)
    columns = list(ds.column_names)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    fields = spec.field.split(",") if spec.field else None
    if fields is None:
        if "text" in columns:
            fields = ["text"]
        elif "prompt" in columns and "answer" in columns:
            fields = ["prompt", "answer"]
        else:
            raise TaskSpecError(
                f"Task {spec.name!r}: {spec.dataset} (split {split!r}) has no 'text' column and no "
                f"'prompt' + 'answer' columns (columns: {', '.join(columns)}).",
                hint=f"Name the column: {spec.name}={spec.dataset}:{split}:COLUMN (or :PROMPT,ANSWER).")
    missing = [f for f in fields if f not in columns]
    if missing:
        raise TaskSpecError(f"Task {spec.name!r}: no column {', '.join(map(repr, missing))} in {spec.dataset} "
                            f"(split {split!r}; columns: {', '.join(columns)}).",
                            hint="Check the field part of NAME=DATASET[:split][:field].")
    data = TaskData(spec=spec, split=split)
    if len(fields) == 1:
        data.texts = [str(x) for x in ds[fields[0]] if x is not None and str(x)]
    else:
        pairs = [(str(p), str(a)) for p, a in zip(ds[fields[0]], ds[fields[1]]) if p is not None and a]
        data.prompts = [p for p, _ in pairs]
        data.answers = [a for _, a in pairs]
    if not len(data):
        raise TaskSpecError(f"Task {spec.name!r}: {spec.dataset} (split {split!r}) has no non-empty records.")
    return data


def _load_split(spec: TaskSpec):
    import datasets

    path = Path(spec.dataset).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise TaskSpecError(f"Task {spec.name!r}: cannot read {spec.dataset} (unknown file type).",
                                    hint=f"Use one of: {', '.join(sorted(_FILE_BUILDERS))}.")
            loaded = datasets.load_dataset(builder, data_files=str(path))
        elif path.is_dir() or _looks_local(spec.dataset):
            if not path.exists():
                raise TaskSpecError(f"Task {spec.name!r}: {spec.dataset} does not exist.",
                                    hint="Give an existing data file or folder, or a Hub dataset ID org/name.")
            loaded = datasets.load_dataset(str(path))
        else:
            loaded = datasets.load_dataset(spec.dataset)
    except MergeError:
        raise
    except Exception as exc:  # datasets raises many kinds (not found, bad file, no access)
        raise TaskSpecError(f"Task {spec.name!r}: cannot load dataset {spec.dataset!r}: "
                            f"{type(exc).__name__}: {exc}",
                            hint="Check the path or Hub ID (and HF_ENDPOINT / HF_TOKEN for private data).") from None
    splits = list(loaded.keys())
    if spec.split is not None:
        if spec.split not in loaded:
            raise TaskSpecError(f"Task {spec.name!r}: {spec.dataset} has no split {spec.split!r}.",
                                hint=f"Splits: {', '.join(splits)}.")
        return spec.split, loaded[spec.split]
    if len(splits) == 1:
        return splits[0], loaded[splits[0]]
    for name in _SPLIT_PREFERENCE:
        if name in loaded:
            return name, loaded[name]
    raise TaskSpecError(f"Task {spec.name!r}: {spec.dataset} has several splits ({', '.join(splits)}).",
                        hint=f"Pick one: {spec.name}={spec.dataset}:SPLIT.")


def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text \
        or Path(text).suffix.lower() in _FILE_BUILDERS


@dataclass
class TaskScore:
    """One model on one task: mean token loss (over the scored tokens) and exact match."""

    loss: float
    tokens: int
    samples: int
    #: fraction of prompt/answer records whose answer greedy decoding reproduces; None for plain text
    exact_match: float | None = None


@dataclass
class EvalRow:
    """One evaluated model: a label for the table, the model reference and its scores per task."""

    label: str
    model: str
    role: str = ""
    scores: dict[str, TaskScore] = field(default_factory=dict)


@dataclass
class EvalTable:
    """Scores of every model on every task, and the fine-tune of each task (for ALD)."""

    tasks: list[TaskSpec]
    rows: list[EvalRow]
    #: task name -> label of the row holding that task's fine-tune
    task_models: dict[str, str] = field(default_factory=dict)

    def row(self, label: str) -> EvalRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def loss(self, label: str, task: str) -> float:
        return self.row(label).scores[task].loss

    def ald(self, label: str) -> float | None:
        """Mean over tasks of loss(model, t) − loss(fine-tune of t, t); None without task models."""
        if not self.task_models:
            return None
        diffs = [self.loss(label, t) - self.loss(self.task_models[t], t) for t in self.task_models]
        return sum(diffs) / len(diffs)

    def to_markdown(self, digits: int = 4) -> str:
        """One row per model: loss per task (and exact match for prompt/answer tasks), then ALD."""
        em_tasks = {t.name for t in self.tasks
                    if any(r.scores[t.name].exact_match is not None for r in self.rows)}
        head = ["model"]
        if any(r.role for r in self.rows):
            head.append("role")
        for t in self.tasks:
            head.append(f"{t.name} loss")
            if t.name in em_tasks:
                head.append(f"{t.name} EM")
        if self.task_models:
            head.append("ALD")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.label] + ([r.role] if "role" in head else [])
            for t in self.tasks:
                s = r.scores[t.name]
                cells.append(f"{s.loss:.{digits}f}")
                if t.name in em_tasks:
                    cells.append(f"{s.exact_match:.3f}")
            if self.task_models:
                cells.append(f"{self.ald(r.label):+.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": [t.spec for t in self.tasks],
            "task_models": dict(self.task_models),
            "rows": [{"label": r.label, "model": r.model, "role": r.role, "ald": self.ald(r.label),
                      "scores": {k: vars(v) for k, v in r.scores.items()}} for r in self.rows],
        }

    def plot(self, path: str | Path, title: str = "Per-task loss (lower is better)") -> Path:
        """PNG: grouped bars of loss per task for each model, ALD in the legend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        n, names = len(self.rows), [t.name for t in self.tasks]
        width = 0.8 / max(n, 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) * max(n, 3) / 3), 4.0))
        colors = plt.get_cmap("tab20").colors  # 20 distinct colours: base, fine-tunes and every method
        for i, r in enumerate(self.rows):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(names))]
            ald = self.ald(r.label)
            label = r.label if ald is None else f"{r.label} (ALD {ald:+.3f})"
            ax.bar(xs, [r.scores[t].loss for t in names], width, label=label, color=colors[i % len(colors)])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("mean token loss")
        ax.set_title(title)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def evaluate(models: Sequence[str] | Mapping[str, str], tasks: Sequence[str | TaskSpec], *,
             max_samples: int | None = None, batch_size: int = 8, device: str = "auto",
             dtype: str = "auto", task_models: Mapping[str, str] | None = None,
             roles: Mapping[str, str] | None = None, progress: bool = True) -> EvalTable:
    """Mean token loss (and exact match) of each model on each task; ALD when `task_models` is given.

    `models`: references (local folders or Hub IDs) or a mapping label -> reference. `task_models`:
    task name -> the fine-tune of that task (a label of `models`, or a reference, which is added).
    `dtype` "auto": float32 on CPU (bfloat16 matmuls there are slow and coarse), the stored dtype on GPU.

    Example:
        >>> t = evaluate({"merged": "out/"}, ["math=math.jsonl"], task_models={"math": "math-ft/"})
        >>> t.ald("merged")
    """
    if batch_size < 1:
        raise MergeError(f"Invalid batch size {batch_size}.", hint="Use --batch-size 1 or more.")
    if max_samples is not None and max_samples < 1:
        raise MergeError(f"Invalid max samples {max_samples}.", hint="Use --max-samples 1 or more.")
    labelled: dict[str, str] = dict(models) if isinstance(models, Mapping) else {str(m): str(m) for m in models}
    specs = [parse_task(t) for t in tasks]
    if not specs:
        raise TaskSpecError("No task given.", hint="Pass --task NAME=DATASET[:split][:field] (repeatable).")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise TaskSpecError(f"Task names must be unique: {', '.join(names)}.")
    resolved_task_models: dict[str, str] = {}
    for task, model in (task_models or {}).items():
        if task not in names:
            raise TaskSpecError(f"--task-model names task {task!r}, which is not among the tasks "
                                f"({', '.join(names)}).", hint="Use --task-model TASK=MODEL with a task given by --task.")
        if model in labelled:
            resolved_task_models[task] = model
        else:
            label = next((k for k, v in labelled.items() if v == model), None)
            if label is None:
                label = model
                labelled[label] = model
            resolved_task_models[task] = label
    if task_models and set(resolved_task_models) != set(names):
        missing = [n for n in names if n not in resolved_task_models]
        raise TaskSpecError(f"ALD needs the fine-tune of every task; none given for {', '.join(missing)}.",
                            hint="Add --task-model NAME=MODEL for each task.")
    if not labelled:
        raise MergeError("No model to evaluate.", hint="Pass one or more model folders or Hub IDs.")

    data = [load_task(s, max_samples) for s in specs]
    dev = _device(device)
    rows = []
    for label, ref in labelled.items():
        model, tok = load_model(ref, dev, dtype)
        row = EvalRow(label=label, model=ref, role=(roles or {}).get(label, ""))
        for d in data:
            row.scores[d.spec.name] = score_task(model, tok, d, batch_size=batch_size, progress=progress,
                                                 desc=f"{label} · {d.spec.name}")
        rows.append(row)
        del model
    return EvalTable(tasks=specs, rows=rows, task_models=resolved_task_models)


def _device(name: str) -> torch.device:
    from ..api import select_device

    return select_device(name)


def load_model(ref: str, device: torch.device, dtype: str = "auto"):
    """A causal LM and its tokenizer from a local folder or a Hub ID (`org/name[@revision]`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..sources.refs import parse_ref

    r = parse_ref(ref)
    where = str(r.local_path) if r.local_path else r.repo_id
    kwargs: dict[str, Any] = {} if r.local_path else {"revision": r.revision}
    if dtype == "auto":
        torch_dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot load model {ref!r} for evaluation: {exc}",
                         hint="Give a folder with config.json, weights and tokenizer files, or a Hub ID.") from None
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token  # only for padding: padded positions are never scored
    return model, tok


@dataclass
class _Example:
    ids: list[int]
    #: index of the first scored token (tokens before it are context only)
    start: int


def _examples(tok, data: TaskData, max_len: int) -> list[_Example]:
    out = []
    if not data.is_prompt_answer:
        for text in data.texts:
            ids = tok(text)["input_ids"][:max_len]
            if len(ids) >= 2:  # the first token is never predicted
                out.append(_Example(ids, 1))
        return out
    for prompt, answer in zip(data.prompts, data.answers):
        # Tokenized apart so the answer's tokens are exactly the answer's (a joint tokenization
        # can merge across the boundary); the prompt keeps the tokenizer's special tokens.
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        if not a:
            continue
        ids = (p + a)[-max_len:]  # keep the answer: drop the prompt's start when too long
        start = max(len(ids) - len(a), 1)
        out.append(_Example(ids, start))
    return out


@torch.no_grad()
def score_task(model, tok, data: TaskData, *, batch_size: int = 8, progress: bool = True,
               desc: str = "") -> TaskScore:
    """Sum of token NLL over the scored tokens / their number; exact match for prompt/answer records.

    Exact match is greedy decoding's: every answer token is the arg-max after the prompt and the
    answer tokens before it. That is what greedy generation of len(answer) tokens yields, computed
    in the same forward pass as the loss.
    """
    from huggingface_hub.utils import tqdm

    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    examples = _examples(tok, data, max_len)
    if not examples:
        raise TaskSpecError(f"Task {data.spec.name!r}: no record has a token to score.",
                            hint="Records need at least two tokens (or a non-empty answer).")
    # Longest first: batches of similar lengths pad less; results do not depend on the order.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    total, count, hits = 0.0, 0, 0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        exs = [examples[i] for i in batch]
        width = max(len(e.ids) for e in exs)
        ids = torch.full((len(exs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(exs), width), dtype=torch.long)
        labels = torch.full((len(exs), width), -100, dtype=torch.long)
        for j, e in enumerate(exs):  # right padding: real tokens keep positions 0..n-1
            n = len(e.ids)
            ids[j, :n] = torch.tensor(e.ids)
            mask[j, :n] = 1
            labels[j, e.start:n] = ids[j, e.start:n]
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                reduction="none")
        scored = target != -100
        total += float(nll[scored].double().sum())
        count += int(scored.sum())
        if data.is_prompt_answer:
            right = (logits.argmax(-1) == target) | ~scored
            hits += int(right.all(dim=1).sum())
    loss = total / count
    if not math.isfinite(loss):
        log.warning("warning: task %s: the loss is not finite (%s)", data.spec.name, loss)
    return TaskScore(loss=loss, tokens=count, samples=len(examples),
                     exact_match=hits / len(examples) if data.is_prompt_answer else None)
