"""Pickle-only inputs (`pytorch_model*.bin`): converted to safetensors shards, then read like any other input.

Refused by default. With `--allow-pickle` (recipe key `allow_pickle`) each `.bin` shard is read
with torch's weights-only unpickler (`torch.load(weights_only=True)`, memory-mapped where the file
format allows): a pickle that would call anything but tensor rebuilding is refused, naming the file,
before any of its code runs. Each shard is written to a safetensors file in a cache folder keyed by
the Hub commit (Hub inputs) or by the `.bin` files' SHA-256 (local folders), one shard at a time, so
memory holds at most one shard of one model; later merges reuse the converted shards.

Planning does not download `.bin` files: tensor names come from `pytorch_model.bin.index.json` (or,
for a single `pytorch_model.bin`, from the config's architecture) and shapes from the config, marked
provisional; `convert_inputs` converts before the merge, and the plan is checked again on the real
headers before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import threading
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from ..constants import PICKLE_CACHE_ENV, env
from ..errors import InputError, UnsafePickleError
from ..dtype_names import CONFIG_TO_ST
from ..safetensors_io import TORCH_TO_ST, TensorMeta, build_header, disk_full_is_clear, dtype_itemsize, read_header
from .hub_calls import api as hub_api, call
from .local import INDEX_FILE, SINGLE_FILE, has_safetensors, read_config, safe_relative
from .model import ModelInfo
from .refs import ModelRef

log = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class PickleSource:
    """Where a pickle-only model's `.bin` shards are, before they are converted."""

    model: str
    bin_files: tuple[str, ...]
    #: (tensor name, .bin file) from pytorch_model.bin.index.json; None for a single pytorch_model.bin
    index: tuple[tuple[str, str], ...] | None
    repo_id: str | None = None
    sha: str | None = None
    folder: Path | None = None
    #: a pull request of the repo that adds safetensors weights with the same names ("org/name@refs/pr/N")
    conversion_pr: str | None = None


def converted_name(bin_file: str) -> str:
    """`pytorch_model-00001-of-00002.bin` -> `pytorch_model-00001-of-00002.safetensors`."""
    return bin_file[: -len(".bin")] + ".safetensors"


def source_file(src: PickleSource, converted: str) -> str:
    """The `.bin` shard a converted file comes from."""
    for f in src.bin_files:
        if converted_name(f) == converted:
            return f
    raise KeyError(converted)


def _index_map(index: Any, model: str) -> tuple[tuple[str, str], ...]:
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(f, str) for f in wm.values()):
        raise InputError(f"{model}: {PICKLE_INDEX} has no usable weight_map.",
                         hint="The index is damaged; re-download the model.")
    for f in wm.values():
        if not f.endswith(".bin"):
            raise InputError(f"{model}: {PICKLE_INDEX} names {f!r}, which is not a .bin shard.",
                             hint="The index is damaged; re-download the model.")
    return tuple((str(n), safe_relative(f, model)) for n, f in wm.items())


def _source_from_index(index_text: str, model: str, **where: Any) -> PickleSource:
    try:
        index = json.loads(index_text)
    except ValueError as exc:
        raise InputError(f"{model}: {PICKLE_INDEX} is not valid JSON ({exc}).") from None
    pairs = _index_map(index, model)
    files = tuple(sorted({f for _, f in pairs}))
    return PickleSource(model=model, bin_files=files, index=pairs, **where)


def local_source(folder: Path, model: str) -> PickleSource | None:
    """The `.bin` shards of a local model folder in the transformers layout, or None."""
    if (folder / PICKLE_INDEX).is_file():
        src = _source_from_index((folder / PICKLE_INDEX).read_text(), model, folder=folder)
        for f in src.bin_files:
            if not (folder / f).is_file():
                raise InputError(f"{model}: shard {f} named in {PICKLE_INDEX} is missing.",
                                 hint="Re-download the model (an interrupted download?).")
        return src
    if (folder / PICKLE_SINGLE).is_file():
        return PickleSource(model=model, bin_files=(PICKLE_SINGLE,), index=None, folder=folder)
    return None


def remote_source(repo_id: str, sha: str, files: Iterable[str], model: str, token: str | None) -> PickleSource | None:
    """The `.bin` shards of a Hub repo at a commit (only the small index is downloaded), or None."""
    from huggingface_hub import hf_hub_download

    files = set(files)
    if PICKLE_INDEX in files:
        path = call(model, hf_hub_download, repo_id, PICKLE_INDEX, revision=sha, token=token)
        return _source_from_index(Path(path).read_text(), model, repo_id=repo_id, sha=sha)
    if PICKLE_SINGLE in files:
        return PickleSource(model=model, bin_files=(PICKLE_SINGLE,), index=None, repo_id=repo_id, sha=sha)
    return None


def find_conversion_pr(repo_id: str, names: Iterable[str] | None, token: str | None) -> str | None:
    """`org/name@refs/pr/N` of an open pull request that adds safetensors weights with these tensor names.

    The Hub's conversion bot (and users) open such PRs on pickle-only repos; pointing at one avoids
    unpickling altogether. `names` None (a single .bin without index): any PR with safetensors weights.
    Best effort: any failure to look means no suggestion, never a failed merge.
    """
    wanted = set(names) if names is not None else None
    try:
        api = hub_api(token)
        prs = api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
        # Newest first: a later conversion supersedes an older one.
        for pr in sorted(prs, key=lambda r: int(r.ref.rsplit("/", 1)[-1]), reverse=True):
            info = api.model_info(repo_id, revision=pr.target_commit)
            files = {s.rfilename for s in info.siblings or []}
            if SINGLE_FILE not in files and INDEX_FILE not in files:
                continue
            if wanted is not None:
                meta = api.get_safetensors_metadata(repo_id, revision=pr.target_commit)
                if set(meta.weight_map) != wanted:
                    continue
            return f"{repo_id}@{pr.ref}"
    except Exception as exc:  # the suggestion is a courtesy: a failed lookup changes nothing else
        log.debug("could not look for a safetensors conversion PR of %s: %s", repo_id, exc)
    return None


def pickle_names(src: PickleSource) -> list[str] | None:
    return [n for n, _ in src.index] if src.index is not None else None


def provisional_info(ref: ModelRef, config: dict[str, Any], src: PickleSource) -> ModelInfo:
    """A `ModelInfo` for planning without the `.bin` files: names from the index, shapes from the config.

    Shapes and dtypes are not trusted: `build_plan` skips comparing them (`ModelInfo.provisional`)
    and `convert_inputs` replaces this with the converted shards' real headers.
    """
    from .architecture import skeleton_names  # what the config implies; the plan's own check uses it too

    shapes = skeleton_names(config) or {}
    dtype = CONFIG_TO_ST.get(str(config.get("dtype") or config.get("torch_dtype")), "F32")
    if src.index is not None:
        placed = list(src.index)
    else:
        names = [n for n in shapes if not (config.get("tie_word_embeddings") and n.endswith("lm_head.weight"))]
        placed = [(n, PICKLE_SINGLE) for n in names]
    tensors: dict[str, TensorMeta] = {}
    for name, file in placed:
        shape = tuple(shapes.get(name, (0,)))
        n = dtype_itemsize(dtype)
        for s in shape:
            n *= s
        tensors[name] = TensorMeta(name, converted_name(file), dtype, shape, (0, n))
    return ModelInfo(ref=ref, config=config, tensors=tensors,
                     weight_files=[converted_name(f) for f in src.bin_files], pickle=src)


def plan_note(info: ModelInfo) -> str:
    src = info.pickle
    assert src is not None
    where = (f"tensor names from {PICKLE_INDEX}" if src.index is not None
             else f"tensor names from the config's architecture (a single {PICKLE_SINGLE} has no index)")
    note = (f"{info.name}: pickle weights (--allow-pickle): {where}; shapes and dtypes are checked after "
            f"download and conversion to safetensors, before anything is written")
    if src.conversion_pr:
        note += f"; use {src.conversion_pr} (adds safetensors) to skip the conversion"
    return note


# ---------------------------------------------------------------- conversion

def cache_root() -> Path:
    from huggingface_hub import constants

    where = env(PICKLE_CACHE_ENV)
    return Path(where).expanduser() if where else Path(constants.HF_HOME) / "hf-metagpt" / "converted"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(src: PickleSource, root: Path | None = None) -> Path:
    """Hub: one folder per repo and commit (immutable). Local: per content hash of the `.bin` files."""
    root = root or cache_root()
    if src.repo_id is not None:
        assert src.sha is not None
        return root / "hub" / src.repo_id.replace("/", "--") / src.sha
    assert src.folder is not None
    digest = hashlib.sha256(json.dumps([[f, file_sha256(src.folder / f)] for f in src.bin_files]).encode())
    return root / "sha256" / digest.hexdigest()


_GLOBAL = re.compile(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand [^\n]+|[^\n]*not an allowed global[^\n]*)")


def _load_weights_only(bin_path: Path, model: str, file: str) -> dict[str, Any]:
    import torch

    try:
        try:
            obj = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped; still weights-only.
            obj = torch.load(bin_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _GLOBAL.search(str(exc))
        raise UnsafePickleError(
            f"{model}: {file} is a pickle that asks to run code or build objects other than tensors"
            + (f" ({what.group(1).strip()})" if what else "")
            + "; refused even with --allow-pickle, and nothing in it was run.",
            hint="Do not load this file outside a sandbox. Use a safetensors version of the model, or "
                 "convert it yourself in an isolated environment you trust.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(f"{model}: {file} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0]}).",
                         hint="Re-download the file; it may be truncated or damaged.") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InputError(f"{model}: {file} holds a {type(obj).__name__} rather than a flat dict of tensors.",
                         hint="Only transformers checkpoints (state dicts saved by save_pretrained) can be converted.")
    return obj


def convert_shard(bin_path: str | Path, out_path: str | Path, *, model: str = "", file: str | None = None) -> dict[str, TensorMeta]:
    """Convert one `.bin` state-dict shard to a safetensors file (atomically); its header.

    The tensors are memory-mapped (zip format) and written one after the other: nothing is copied
    into anonymous memory, and the mapped (reclaimable) pages of at most this one shard are resident
    (measured: +387 MiB peak RSS for a 384 MiB shard). The legacy format is read whole: one shard too.
    Tensors that share storage (tied weights) are each written in full, as safetensors stores no
    aliasing.

    Raises:
        UnsafePickleError: the pickle asks for a global outside torch's weights-only allow-list.
        InputError: not a readable checkpoint, or not a flat dict of tensors.
    """
    import torch

    bin_path, out_path = Path(bin_path), Path(out_path)
    file = file or bin_path.name
    state = _load_weights_only(bin_path, model or str(bin_path.parent.name), file)
    entries = []
    for name, t in state.items():
        code = TORCH_TO_ST.get(t.dtype)
        if code is None:
            raise InputError(f"{model}: {file} stores {name!r} as {t.dtype}, which safetensors cannot hold.")
        entries.append((name, code, tuple(t.shape)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process and thread: two merges converting the same shard never share a file.
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    header, _ = build_header(entries, {"format": "pt"})
    try:
        with disk_full_is_clear(tmp), open(tmp, "wb") as f:
            f.write(header)
            for name, t in state.items():  # in header order: build_header lays tensors out as listed
                t = t.detach().contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    del state
    os.replace(tmp, out_path)
    return read_header(out_path, out_path.name)


def ensure_converted(src: PickleSource, bin_file: str, out_dir: Path, token: str | None = None,
                     tqdm_class: type | None = None) -> Path:
    """The converted safetensors copy of `bin_file` in `out_dir`, converting it when missing.

    Hub shards are downloaded into a scratch folder beside the cache and deleted once converted
    (the converted copy is what later merges reuse); local shards are read in place. `tqdm_class`:
    the download's progress (a stage's bar, `_progress.StageBar.file_class`).
    """
    out = out_dir / converted_name(bin_file)
    if out.is_file():
        return out
    scratch = None
    if src.repo_id is not None:
        from huggingface_hub import hf_hub_download

        scratch = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{threading.get_ident()}.download"
        bin_path = Path(call(src.model, hf_hub_download, src.repo_id, bin_file, revision=src.sha,
                              local_dir=scratch, token=token, tqdm_class=tqdm_class))
    else:
        assert src.folder is not None
        bin_path = src.folder / bin_file
    try:
        log.info("converting %s of %s to safetensors", bin_file, src.model)
        convert_shard(bin_path, out, model=src.model, file=bin_file)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def convert_info(info: ModelInfo, token: str | None = None, root: Path | None = None,
                 tqdm_class: type | None = None) -> ModelInfo:
    """The input as converted safetensors shards: real headers, checked against the `.bin` index."""
    src = info.pickle
    assert src is not None
    out_dir = info.weights_dir or cache_dir(src, root)
    tensors: dict[str, TensorMeta] = {}
    for bin_file in src.bin_files:
        path = ensure_converted(src, bin_file, out_dir, token, tqdm_class)
        for name, meta in read_header(path, path.name).items():
            if name in tensors:
                raise InputError(f"{info.name}: tensor {name!r} is stored twice ({tensors[name].file}, {bin_file}).")
            tensors[name] = meta
    if src.index is not None:
        for name, bin_file in src.index:
            meta = tensors.get(name)
            if meta is None or meta.file != converted_name(bin_file):
                raise InputError(f"{info.name}: {PICKLE_INDEX} places {name!r} in {bin_file}, but that shard does not hold it.",
                                 hint="The index is stale or damaged; re-download the model.")
    return replace(info, tensors=tensors, weight_files=[converted_name(f) for f in src.bin_files], weights_dir=out_dir)


def convert_inputs(infos: list[ModelInfo], token: str | None = None) -> list[ModelInfo]:
    """Every provisional (pickle) input converted, one shard at a time; the others as they are.

    The `.bin` shards still to download from the Hub share one "download pickle shards" bar.
    """
    from .._progress import StageBar, file_bar_class

    total = 0
    for i in infos:
        if i.provisional and i.pickle.repo_id is not None:
            out_dir = i.weights_dir or cache_dir(i.pickle, None)
            total += sum((i.files or {}).get(f) or 0 for f in i.pickle.bin_files if not (out_dir / converted_name(f)).is_file())
    stage = StageBar("download pickle shards", total) if total else None
    done = False
    try:
        out = [convert_info(i, token, tqdm_class=file_bar_class(stage, None) if stage else None) if i.provisional else i
               for i in infos]
        done = True
        return out
    finally:
        if stage is not None:
            stage.close(complete=done)


def load_pickle_info(ref: ModelRef) -> ModelInfo | None:
    """A local folder with only `pytorch_model*.bin` weights as a provisional input (`--allow-pickle`);
    None when the folder has safetensors weights (read as usual) or no pickle weights either."""
    folder = ref.local_path
    if folder is None or has_safetensors(folder):
        return None
    config = read_config(ref)
    src = local_source(folder, ref.display)
    return provisional_info(ref, config, src) if src is not None else None
