"""`hf-metagpt verify DIR`: re-read a merged folder and check that it is whole and what it claims.

Without inputs it checks the folder alone: the index lists every stored tensor exactly once, every
shard it names exists and has a valid header with its data complete, `total_size` is the sum of the
tensors' bytes, names/shapes/dtypes agree with `config.json`, and every tensor is finite. With
`--against BASE MODEL...` it also recomputes a sample of tensors from the inputs with the method,
granularity and λ recorded in `metagpt_coefficients.json` (checking those λ against the recorded
squared norms), and compares them with what was written, to within 1 ulp of the output dtype.

Reads one tensor at a time; memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from ..engine.plan import is_vocab_tensor, norm_group_of
from ..sources.architecture import num_layers, skeleton_mismatches, skeleton_names
from ..errors import IntegrityError, MergeError
from ..dtype_names import CONFIG_TO_ST
from ..safetensors_io import TensorMeta, read_header
from ..sources.local import INDEX_FILE, SINGLE_FILE, load_local_info, safe_relative
from ..sources.model import ModelInfo
from ..options import local_name
from ..result import COEFFICIENTS_FILE
from ..sources.refs import parse_ref

_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
MAX_SHOWN = 10


@dataclass
class VerifyReport:
    """What `verify` checked (it raises `IntegrityError` instead of returning when anything is wrong)."""

    folder: Path
    tensors: int = 0
    shards: int = 0
    total_size: int = 0
    recomputed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"OK: {self.folder}: {self.tensors} tensors in {self.shards} shard(s), "
                 f"{self.total_size} bytes; index, headers, shapes, dtypes and finiteness checked"]
        if self.recomputed:
            lines.append(f"OK: {len(self.recomputed)} tensor(s) recomputed from the inputs match within 1 ulp")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Problems:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self, hint: str = "Re-run the merge (with --overwrite) to rewrite the output.") -> None:
        if not self.items:
            return
        shown = self.items[:MAX_SHOWN]
        more = f"\n  ... and {len(self.items) - MAX_SHOWN} more" if len(self.items) > MAX_SHOWN else ""
        raise IntegrityError(f"{self.folder} failed verification ({len(self.items)} problem(s)):\n  - "
                             + "\n  - ".join(shown) + more, hint=hint)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dupes = []
    for k, v in pairs:
        if k in out:
            dupes.append(k)
        out[k] = v
    if dupes:
        out["\0duplicates"] = dupes
    return out


def _read_index(folder: Path, problems: _Problems) -> tuple[dict[str, str], int | None]:
    """weight_map and total_size; duplicate names (which json.loads would silently drop) are problems."""
    path = folder / INDEX_FILE
    if not path.is_file():
        if (folder / SINGLE_FILE).is_file():
            metas = read_header(folder / SINGLE_FILE)
            return {n: SINGLE_FILE for n in metas}, None
        raise IntegrityError(f"{folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}.",
                             hint="Point at a merged model folder (a merge's --output).")
    try:
        index = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{INDEX_FILE} in {folder} is not valid JSON ({exc}).",
                             hint="Re-run the merge (with --overwrite) to rewrite the output.") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise IntegrityError(f"{INDEX_FILE} in {folder} has no weight_map.",
                             hint="Re-run the merge (with --overwrite) to rewrite the output.")
    for name in wm.pop("\0duplicates", []):
        problems.add(f"{INDEX_FILE} lists tensor {name!r} more than once")
    meta = index.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if not isinstance(total, int) or isinstance(total, bool):
        problems.add(f"{INDEX_FILE} has no integer metadata.total_size")
        total = None
    out = {}
    for name, file in wm.items():
        if not isinstance(file, str):
            problems.add(f"{INDEX_FILE} places {name!r} in {file!r}, which is not a file name")
            continue
        try:
            out[name] = safe_relative(file, str(folder))
        except MergeError:
            problems.add(f"{INDEX_FILE} places {name!r} in {file!r}, outside the folder")
    return out, total


def _config_dtype(config: dict[str, Any]) -> str | None:
    name = config.get("dtype") or config.get("torch_dtype")
    return CONFIG_TO_ST.get(name) if isinstance(name, str) else None


def check_folder(folder: Path) -> tuple[VerifyReport, dict[str, TensorMeta], dict[str, Any]]:
    """Every check that needs the output alone; raises `IntegrityError` listing what is wrong."""
    folder = Path(folder)
    _refuse_other_folders(folder)
    problems = _Problems(folder)
    report = VerifyReport(folder)
    config = _read_output_config(folder)
    files, stored, nbytes = _check_shards(folder, problems)
    problems.raise_if_any()
    _check_against_config(config, stored, problems, report)
    problems.raise_if_any(hint="config.json and the weights disagree; re-run the merge (with --overwrite).")
    _check_finite(folder, files, stored, problems)
    problems.raise_if_any()
    report.tensors, report.shards, report.total_size = len(stored), len(files), nbytes
    return report, stored, config


def _refuse_other_folders(folder: Path) -> None:
    """A folder that is not a merge's full-weight output: not a folder, a work folder, a LoRA adapter."""
    if not folder.is_dir():
        raise IntegrityError(f"{folder} is not a folder.", hint="Pass the merge's --output folder.")
    if folder.name.endswith(".hf-metagpt-partial"):
        raise IntegrityError(f"{folder} is the work folder of an unfinished merge, not an output.",
                             hint="Rerun the same merge command: it resumes from the finished shards.")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise IntegrityError(f"{folder} is a LoRA adapter (a merge with --output-format lora); verify checks "
                             "full-weight outputs.",
                             hint="Load it with peft (PeftModel.from_pretrained(base_model, folder)); to check the "
                                  "arithmetic, merge without --output-format lora and verify that folder.")


def _read_output_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{folder}: config.json is missing or not valid JSON ({exc}).",
                             hint="Re-run the merge (with --overwrite) to rewrite the output.") from None
    return config


def _check_shards(folder: Path, problems: _Problems) -> tuple[list[str], dict[str, TensorMeta], int]:
    """The index against the shards' headers: (shard files, every stored tensor, their bytes)."""
    weight_map, total = _read_index(folder, problems)
    files = sorted(set(weight_map.values()))
    stored: dict[str, TensorMeta] = {}
    unreadable = False
    for file in files:
        if not (folder / file).is_file():
            problems.add(f"shard {file} named in {INDEX_FILE} is missing")
            unreadable = True
            continue
        try:
            header = read_header(folder / file, file)
        except MergeError as exc:
            problems.add(exc.message)
            unreadable = True
            continue
        for name, meta in header.items():
            if name in stored:
                problems.add(f"tensor {name!r} is stored twice ({stored[name].file} and {file})")
            elif weight_map.get(name) != file:
                where = f"places it in {weight_map[name]}" if name in weight_map else "does not list it"
                problems.add(f"{file} holds tensor {name!r} but {INDEX_FILE} {where}")
            stored[name] = meta
    for name, file in weight_map.items():
        if name not in stored and (folder / file).is_file():
            problems.add(f"{INDEX_FILE} names tensor {name!r} in {file}, but that shard does not hold it")
    strays = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files)
    for s in strays:
        problems.add(f"{s} is not named by {INDEX_FILE} (a leftover?)")
    nbytes = sum(m.nbytes for m in stored.values())
    if total is not None and total != nbytes and not unreadable:
        problems.add(f"{INDEX_FILE} says total_size {total}, but the tensors hold {nbytes} bytes")
    return files, stored, nbytes


def _check_against_config(config: dict[str, Any], stored: dict[str, TensorMeta], problems: _Problems,
                          report: VerifyReport) -> None:
    """The stored dtypes, names and shapes against what config.json says and implies."""
    dtype = _config_dtype(config)
    for name, meta in stored.items():
        if dtype and meta.is_floating and meta.dtype != dtype:
            problems.add(f"tensor {name!r} is stored as {meta.dtype}, but config.json says {dtype}")
    expected = skeleton_names(config) if "model_type" in config else None
    if expected is not None:
        missing, extra, shapes = skeleton_mismatches(expected, stored, bool(config.get("tie_word_embeddings")))
        for n in missing:
            problems.add(f"tensor {n!r}, which config.json implies, is not stored")
        for n, shape, implied in shapes:
            problems.add(f"tensor {n!r} has shape {list(shape)}, config.json implies {list(implied)}")
        if extra:
            report.notes.append(f"{len(extra)} tensor(s) the architecture does not use, e.g. {extra[0]!r}")
    else:
        report.notes.append("config.json names no architecture transformers knows: names and shapes not checked against it")


def _check_finite(folder: Path, files: list[str], stored: dict[str, TensorMeta], problems: _Problems) -> None:
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():
                if stored[name].is_floating and not bool(torch.isfinite(f.get_tensor(name)).all()):
                    problems.add(f"tensor {name!r} in {file} holds NaN or Inf values")


def _ulp_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0,
               slack: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Boolean mask of entries where `actual` is more than `ulps` ulp (of its dtype) plus `slack` from `expected`."""
    dt = actual.dtype
    mant = _MANTISSA.get(dt, 23)
    tiny = torch.finfo(dt).smallest_normal * torch.finfo(dt).eps if dt in _MANTISSA else 0.0
    a, e = actual.double(), expected.double()
    mag = torch.maximum(a.abs(), e.abs())
    ulp = torch.where(mag > 0, 2.0 ** (torch.floor(torch.log2(mag.clamp_min(1e-300))) - mant), torch.zeros_like(mag))
    return (a - e).abs() > ulps * ulp + tiny + slack


def _read(info: ModelInfo, name: str) -> torch.Tensor:
    meta = info.tensors[name]
    with safe_open(info.ref.local_path / meta.file, framework="pt") as f:  # type: ignore[operator]
        return f.get_tensor(name)


def check_against(folder: Path, stored: dict[str, TensorMeta], inputs: Sequence[str], samples: int,
                  seed: int, report: VerifyReport) -> None:
    """Recompute `samples` tensors (all when larger) from the inputs and compare within 1 ulp."""
    from ..methods import get_method
    from ..methods.base import TensorContext

    problems = _Problems(folder)
    method_name, granularity, groups, params, mseed, precision = _read_coefficients(folder)
    refs = [parse_ref(x) for x in inputs]
    given = [r.repo_id if r.is_hub else local_name(r.spec) for r in refs]
    same_inputs = _check_order(folder, given)
    refs = [_cached(r) if r.is_hub else r for r in refs]
    infos = [load_local_info(r) for r in refs]
    n_models = len(infos) - 1
    if n_models < 1:
        raise MergeError("--against needs the base and its fine-tunes, in the merge's order.")
    method = get_method(method_name, **params)
    _check_lambdas(groups, method, n_models, problems)
    n_layers = num_layers(infos[0].config)

    names = sorted(stored)
    rng = random.Random(seed)
    chosen = names if samples >= len(names) else sorted(rng.sample(names, samples))
    for name in chosen:
        missing = [i.name for i in infos if name not in i.tensors]
        if missing:
            problems.add(f"tensor {name!r} of the output is not in input {missing[0]}")
            continue
        out = _read_output(folder, stored[name])
        base_raw = _read(infos[0], name)
        if not stored[name].is_floating:
            if not torch.equal(out, base_raw):
                problems.add(f"integer tensor {name!r} differs from the base's")
            report.recomputed.append(name)
            continue
        raws = [base_raw] + [_read(i, name) for i in infos[1:]]
        rows = min(r.shape[0] for r in raws + [out]) if is_vocab_tensor(name) else None
        cut = (lambda t: t[:rows]) if rows is not None else (lambda t: t)
        if any(cut(r).shape != cut(out).shape for r in raws):
            problems.add(f"tensor {name!r}: input shapes {[list(r.shape) for r in raws]} do not fit the output's {list(out.shape)}")
            continue
        group = norm_group_of(name, granularity)
        entry = groups.get(group) or groups.get(name)
        if entry is None:
            problems.add(f"tensor {name!r}: {COEFFICIENTS_FILE} has no λ for its group {group!r}")
            continue
        ctx = TensorContext.of(name, mseed, n_layers)
        expected, slack = _recompute(method, [cut(r) for r in raws], [float(x) for x in entry["lambdas"]], ctx,
                                     precision)
        expected = expected.to(out.dtype)
        bad = _ulp_close(cut(out), expected, slack=slack)
        if bool(bad.any()):
            diff = (cut(out).double() - expected.double()).abs().max().item()
            problems.add(f"tensor {name!r} differs from its recomputation in {int(bad.sum())} element(s) "
                         f"(max |diff| {diff:.3g}, more than 1 ulp of {stored[name].dtype})")
        elif rows is not None and out.shape[0] > rows:
            extra = out[rows:]
            if not any(r.shape[0] == out.shape[0] and torch.equal(r[rows:].to(out.dtype), extra) for r in raws):
                problems.add(f"tensor {name!r}: rows {rows}.. match no input's extra rows")
        report.recomputed.append(name)
    if same_inputs:
        hint = ("The inputs are the ones the merge recorded, in its order: the output was changed or damaged "
                "after the merge; re-run the merge (with --overwrite).")
    else:
        hint = ("Check that --against names the merge's base and fine-tunes in its order (recorded in "
                f"{COEFFICIENTS_FILE}: {_recorded_text(folder)}); if it does, the output was changed or damaged: "
                "re-run the merge (with --overwrite).")
    problems.raise_if_any(hint=hint)


def _recorded(folder: Path) -> list[str] | None:
    """The merge's inputs as its coefficients file names them (base first), without revisions."""
    try:
        coeffs = json.loads((folder / COEFFICIENTS_FILE).read_text())
        refs = [coeffs["base"], *coeffs["models"]]
        return [str(r.get("repo_id") or r["ref"]).split("@")[0] for r in refs]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _recorded_text(folder: Path) -> str:
    names = _recorded(folder)
    return " ".join(names) if names else "not readable"


def _check_order(folder: Path, given: list[str]) -> bool:
    """True when `given` are the recorded inputs in the recorded order; the same inputs in another
    order are refused here (every tensor would differ, and "damaged" would be the wrong news)."""
    recorded = _recorded(folder)
    if recorded is None:
        return False
    if given != recorded and sorted(given) == sorted(recorded):
        raise MergeError(f"--against lists the merge's inputs in another order ({' '.join(given)}).",
                         hint=f"Pass them in the merge's order, base first: --against {' '.join(recorded)} "
                              f"(as recorded in {COEFFICIENTS_FILE}).")
    return given == recorded


def _cached(ref: Any) -> Any:
    """A Hub input of --against as the folder of its files in the Hub cache (verify downloads nothing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(ref.repo_id, revision=ref.sha or ref.revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise MergeError(f"--against {ref.spec}: its files are not in the Hub cache (verify downloads nothing).",
                         hint=f"Download them first (`hf download {ref.repo_id}`), or pass a local folder.") from None
    return parse_ref(path)


def _recompute(method: Any, raws: list[torch.Tensor], lambdas: list[float], ctx: Any,
               precision: str) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The merged tensor the way the merge computed it, and how far that arithmetic may stray.

    A weighted sum the merge accumulated in float64 (`precision`, from the coefficients file) is
    recomputed in float64: exact to the output's rounding even where the task vectors cancel the
    base. The method path (TIES, DARE, ...) runs in float32, as the merge does; its rounding is
    bounded by the magnitudes summed, (T + 2)·eps32·(|θ0| + Σ|λt·τt|), which is far below any
    real error (a wrong λ or tensor moves entries by a share of |τ|)."""
    weights = method.model_weights(lambdas, ctx) if precision == "float64" else None
    if weights is not None:
        w0, ws = weights
        acc = raws[0].to(torch.float64) * w0
        for w, r in zip(ws, raws[1:]):
            acc += r.to(torch.float64) * w
        return acc, 0.0
    base = raws[0].to(torch.float32)
    taus = [r.to(torch.float32) - base for r in raws[1:]]
    taus = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in taus]  # as --allow-nonfinite
    taus = method.transform(taus, ctx)
    magnitude = base.abs().double()
    for lam, tau in zip(lambdas, taus):
        magnitude += abs(lam) * tau.abs().double()
    slack = (len(taus) + 2) * torch.finfo(torch.float32).eps * magnitude
    return method.combine(base, taus, lambdas, ctx), slack


def _read_coefficients(folder: Path) -> tuple[str, str, dict[str, Any], dict[str, Any], int | None, str]:
    """(method, granularity, groups, parameters, seed, precision) from the output's coefficients file."""
    try:
        coeffs = json.loads((folder / COEFFICIENTS_FILE).read_text())
        method_name, granularity = coeffs["method"], coeffs["granularity"]
        groups = {g: v for g, v in coeffs["groups"].items()}
        return (method_name, granularity, groups, coeffs.get("parameters") or {}, coeffs.get("seed"),
                str(coeffs.get("precision") or "float32"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{folder}: {COEFFICIENTS_FILE} is missing or damaged ({exc!r}); --against needs it.",
                             hint="Verify without --against, or re-run the merge.") from None


def _check_lambdas(groups: dict[str, Any], method: Any, n_models: int, problems: _Problems) -> None:
    """Each group has one λ per fine-tune, and (norm-based methods) the λ its squared norms give."""
    for g, v in groups.items():
        lams = v.get("lambdas") if isinstance(v, dict) else None
        if not isinstance(lams, list) or len(lams) != n_models:
            raise IntegrityError(f"{COEFFICIENTS_FILE} has {len(lams) if isinstance(lams, list) else 'no'} λ for "
                                 f"group {g!r}, but {n_models} fine-tune(s) were given to --against.",
                                 hint="Pass the same base and fine-tunes, in the same order, as the merge.")
        sq = v.get("sq_norms")
        if method.uses_group_norms and sq is not None:
            want = method.coefficients([float(x) for x in sq], n_models)
            if any(abs(a - b) > 1e-12 + 1e-9 * abs(b) for a, b in zip(lams, want)):
                problems.add(f"group {g!r}: recorded λ {lams} do not follow from its squared norms {sq} ({want})")
    problems.raise_if_any(hint=f"{COEFFICIENTS_FILE} is inconsistent; re-run the merge.")


def _read_output(folder: Path, meta: TensorMeta) -> torch.Tensor:
    with safe_open(folder / meta.file, framework="pt") as f:
        return f.get_tensor(meta.name)


def verify(folder: str | Path, against: Sequence[str] | None = None, samples: int = 8, seed: int = 0) -> VerifyReport:
    """Check a merged folder (and, with `against` = [base, *fine-tunes], a sample of its tensors).

    Example:
        >>> print(hf_metagpt.verify.verify("merged/", against=["base/", "chat/", "math/"]).summary())
    """
    if samples < 0:
        raise MergeError(f"--samples must be 0 or more, not {samples}.")
    report, stored, _ = check_folder(Path(folder))
    if against:
        check_against(Path(folder), stored, against, samples, seed, report)
    return report
