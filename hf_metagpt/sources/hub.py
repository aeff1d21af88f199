"""The Hub side: resolve IDs to commit SHAs, read remote headers, download what is needed, push.

Every Hub reference is pinned to a commit SHA by `resolve` before anything else is read, and every
later call passes that SHA as the revision, so a commit pushed to a source repo mid-merge changes
nothing. Tokens come from `token=` or huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`)
and are only ever handed to huggingface_hub: never printed, logged or written.

Endpoint, cache and offline settings are huggingface_hub's own (`HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, ...); nothing here re-reads them. Offline, `resolve` pins a reference
to the commit its revision points at in the Hub cache and lists the files cached there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError
from ..safetensors_io import TensorMeta, parse_header_json, read_header
from ..errors import HubAccessError
from .hub_calls import api, call, tok
from .local import (
    INDEX_FILE,
    PICKLE_PATTERNS,
    SINGLE_FILE,
    check_config,
    check_index,
    safe_relative,
    weight_files_from_index,
)
from .model import ModelInfo
from .refs import ModelRef

log = logging.getLogger(__name__)

SIDE_FILES = ("config.json",)
# A PEFT adapter repo (kept in step with lora.py's names; importing lora here would load torch/peft early).
ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
BASE_SIDE_FILES = ("generation_config.json",)


# ---------------------------------------------------------------- retries
# What huggingface_hub retries by itself (2.4): preupload, LFS batch/upload/verify (5xx, 429,
# timeouts, network errors, with backoff), a file's HEAD once more with backoff when nothing is
# cached, and a dropped or timed-out file download (resumed with Range, 5 times). Not retried:
# model_info/repo_info, tree listings, the safetensors header Range reads, a 5xx on a file's GET,
# create_repo/create_branch and the commit POST itself. `hub_calls.call` retries those, a few times with
# exponential backoff, and then says clearly what failed.


# ---------------------------------------------------------------- resolve and read headers

@dataclass
class RemoteModel:
    """A resolved Hub reference: its commit and the files it holds there (name -> size or None)."""

    ref: ModelRef
    files: dict[str, int | None]
    private: bool = False


def resolve(ref: ModelRef, token: str | None = None) -> RemoteModel:
    """Pin a Hub reference to the commit SHA its revision points at now.

    Example:
        >>> resolve(parse_ref("meta-llama/Llama-2-7b-hf@main")).ref.sha
        '01c7f73d771dfac7d292323805ebc428287df4f9'
    """
    from dataclasses import replace

    assert ref.repo_id is not None
    if offline():
        return _resolve_cached(ref)
    info = call(ref.display, api(token).model_info, ref.repo_id, revision=ref.revision, files_metadata=True)
    if not info.sha:
        raise HubAccessError(f"{ref.display}: the Hub gave no commit SHA for this revision.")
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    _remember_revision(ref, info.sha)
    log.info("%s -> %s", ref.display, info.sha)
    return RemoteModel(replace(ref, sha=info.sha), files, bool(info.private))


def remote_code_files(config: dict) -> list[str]:
    """The custom code files a config's `auto_map` names in its own repo (`modeling_x.Class` -> `modeling_x.py`).

    `other-org/repo--module.Class` lives in another repo, which `trust_remote_code` fetches itself.
    """
    auto = config.get("auto_map") if isinstance(config, dict) else None
    out: list[str] = []
    for value in (auto.values() if isinstance(auto, dict) else ()):
        for ref in (value if isinstance(value, list) else [value]):
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                out.append(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return sorted(set(out))


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (at its import): every Hub input comes from its cache."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


OFFLINE_HINT = ("Download it once with network access (a merge or `hf download REPO` fills the Hub cache), "
                "point HF_HOME/HF_HUB_CACHE at the cache that holds it, or unset HF_HUB_OFFLINE.")


def _resolve_cached(ref: ModelRef) -> RemoteModel:
    """Offline: pin a Hub reference to the commit its revision points at in the Hub cache.

    The file listing is the cached snapshot's (the files downloaded before); what a merge needs and the
    cache lacks is named by `remote_info`, before anything is written.
    """
    from huggingface_hub import snapshot_download

    revision = ref.revision or "main"
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: the revision is not recorded there
        log.debug("%s: no cached snapshot for %s: %s", ref.display, revision, exc)
        folder = _only_snapshot(ref, revision)
    sha = folder.name
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    log.warning("%s: HF_HUB_OFFLINE is set, using the Hub cache at commit %s (%s as last downloaded)",
                ref.display, sha, revision)
    return RemoteModel(replace(ref, sha=sha), files, False)


def _repo_cache(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _remember_revision(ref: ModelRef, sha: str) -> None:
    """Record in the Hub cache which commit a branch or tag pointed at (`refs/NAME`, the cache's layout).

    Every download is pinned to the SHA, and huggingface_hub records a revision only when it downloads
    by that revision: without this an offline run could not tell which cached commit `main` was.
    """
    revision = ref.revision or "main"
    if revision == sha:
        return
    try:
        path = _repo_cache(ref.repo_id).joinpath("refs", *revision.split("/"))  # type: ignore[arg-type]
        if path.is_file() and path.read_text().strip() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:  # a read-only cache only loses the offline shortcut
        log.debug("could not record %s -> %s in the Hub cache: %s", ref.display, sha, exc)


def _only_snapshot(ref: ModelRef, revision: str) -> Path:
    """The cached snapshot to use when the revision is not recorded: the only one, or an error."""
    snapshots = _repo_cache(ref.repo_id) / "snapshots"  # type: ignore[arg-type]
    shas = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(shas) == 1 and revision != shas[0] and not _is_sha(revision):
        return snapshots / shas[0]
    if not shas or _is_sha(revision):
        raise HubAccessError(f"{ref.display}: not in the Hub cache and HF_HUB_OFFLINE is set, so the Hub "
                             f"cannot be asked for it (revision {revision}).", hint=OFFLINE_HINT)
    raise HubAccessError(f"{ref.display}: the Hub cache holds {len(shas)} commits of {ref.repo_id} "
                         f"({', '.join(shas)}) and does not record which one {revision} is; HF_HUB_OFFLINE is set.",
                         hint=f"Name the commit: {ref.repo_id}@SHA.")


def _is_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _missing_offline(ref: ModelRef, missing: list[str]) -> HubAccessError:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return HubAccessError(f"{ref.display}: {shown} not in the Hub cache at commit {ref.sha}, and HF_HUB_OFFLINE "
                          f"is set.", hint=OFFLINE_HINT)


def _offline_weights_missing(remote: RemoteModel) -> HubAccessError:
    """Which weight files of a cached snapshot are missing (the index names them when it is cached)."""
    from huggingface_hub import try_to_load_from_cache

    ref = remote.ref
    if INDEX_FILE not in remote.files:
        return _missing_offline(ref, [f"its weights ({SINGLE_FILE} or {INDEX_FILE})"])
    path = try_to_load_from_cache(ref.repo_id, INDEX_FILE, revision=ref.sha)
    try:
        files = weight_files_from_index(json.loads(Path(path).read_text()), ref.display)  # type: ignore[arg-type]
    except (TypeError, ValueError, OSError):
        return _missing_offline(ref, [INDEX_FILE])
    return _missing_offline(ref, [f for f in files if f not in remote.files] or files)


def remote_info(remote: RemoteModel, token: str | None = None, allow_pickle: bool = False) -> ModelInfo:
    """Config and tensor headers of a resolved Hub model, from Range reads of the headers only.

    `allow_pickle`: a repo with only `pytorch_model*.bin` weights gives a provisional info (names
    from its `.bin` index; see `sources.pickle`) instead of an error; nothing but the index is read.
    """
    ref = remote.ref
    name = ref.display
    if ADAPTER_CONFIG in remote.files and SINGLE_FILE not in remote.files and INDEX_FILE not in remote.files:
        return _remote_adapter_info(remote, token)
    if SINGLE_FILE not in remote.files and INDEX_FILE not in remote.files:
        pickles = sorted(f for f in remote.files if any(Path(f).match(p) for p in PICKLE_PATTERNS))
        if pickles:
            return _remote_pickle_info(remote, token, pickles, allow_pickle)
        if offline():
            raise _offline_weights_missing(remote)
        raise InputError(f"{name}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) at {ref.sha}.",
                         hint="Is this a model repo (or a PEFT adapter repo with adapter_config.json)?")
    config = _remote_config(remote, token)

    cached = _cached_headers(remote, token)
    if cached is not None:
        tensors, files = cached
        return ModelInfo(ref=ref, config=config, tensors=tensors, weight_files=files, files=dict(remote.files))
    if offline():
        raise _offline_weights_missing(remote)

    weight_map, files, headers = _remote_headers(remote, token)
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        for tname, tm in parse_header_json(json.dumps(headers[file]).encode(), file).items():
            if weight_map.get(tname, file) != file:
                raise InputError(f"{name}: {INDEX_FILE} places {tname!r} in {weight_map[tname]}, "
                                 f"but {file} holds it.", hint="The index is stale or damaged.")
            if tname in tensors:
                raise InputError(f"{name}: tensor {tname!r} is stored twice ({tensors[tname].file}, {file}).")
            tensors[tname] = tm
    missing = [t for t in weight_map if t not in tensors]
    if missing:
        raise InputError(f"{name}: {INDEX_FILE} lists {missing[0]!r} but no shard holds it.",
                         hint="The index is stale or damaged.")
    return ModelInfo(ref=ref, config=config, tensors=tensors, weight_files=files, files=dict(remote.files))


#: shard headers read at a time (huggingface_hub's get_safetensors_metadata reads them on a thread pool too)
HEADER_READERS = 8


def _remote_headers(remote: RemoteModel, token: str | None) -> tuple[dict[str, str], list[str], dict[str, dict]]:
    """(weight map, shard files, header of each shard) of a Hub model, from Range reads of the headers.

    Each shard's header is its own retried call: a 5xx or a 429 on one shard retries that shard
    only, and headers already read are never read again (a 60-shard model meeting a rate limit
    made ~300 requests when the whole listing was retried).
    """
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import SafetensorsParsingError

    ref, name = remote.ref, remote.ref.display
    if INDEX_FILE in remote.files:
        index_path = call(name, hf_hub_download, ref.repo_id, INDEX_FILE, revision=ref.sha, token=tok(token))
        try:
            index = json.loads(Path(index_path).read_text())
        except ValueError as exc:
            raise InputError(f"{name}: {INDEX_FILE} is not valid JSON ({exc}).",
                             hint="The repo's index is damaged.") from None
        files = weight_files_from_index(index, name)
        weight_map = {str(k): safe_relative(v, name) for k, v in index["weight_map"].items()}
    else:
        files, weight_map = [SINGLE_FILE], {}
    hub = api(token)

    def read(file: str) -> dict:
        try:
            meta = call(name, hub.parse_safetensors_file_metadata, ref.repo_id, file, revision=ref.sha)
        except SafetensorsParsingError as exc:
            raise InputError(f"{name}: cannot read the safetensors header of {file} ({exc}).",
                             hint="The repo's weights are damaged or not safetensors.") from None
        return {t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                for t, i in meta.tensors.items()}

    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(files))) as pool:
        headers = dict(zip(files, pool.map(read, files)))
    return weight_map, files, headers


def _remote_config(remote: RemoteModel, token: str | None) -> dict:
    from huggingface_hub import hf_hub_download

    ref, name = remote.ref, remote.ref.display
    if "config.json" not in remote.files:
        if offline():
            raise _missing_offline(ref, ["config.json"])
        raise InputError(f"{name}: no config.json at {ref.sha}.", hint="Merging needs a transformers model repo.")
    config_path = call(name, hf_hub_download, ref.repo_id, "config.json", revision=ref.sha, token=tok(token))
    try:
        config = json.loads(Path(config_path).read_text())
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{name}: config.json is not valid JSON ({exc}).") from None
    return check_config(config, name)


def _remote_pickle_info(remote: RemoteModel, token: str | None, pickles: list[str], allow_pickle: bool) -> ModelInfo:
    """A repo with only pickle weights: refused (naming a safetensors PR when one exists) unless allowed."""
    from dataclasses import replace

    from .pickle import find_conversion_pr, pickle_names, provisional_info, remote_source

    ref, name = remote.ref, remote.ref.display
    src = remote_source(ref.repo_id, ref.sha, remote.files, name, tok(token))  # type: ignore[arg-type]
    pr = find_conversion_pr(ref.repo_id, pickle_names(src) if src else None, tok(token))  # type: ignore[arg-type]
    if src is None or not allow_pickle:
        message = f"{name}: only pickle weights on the Hub ({', '.join(pickles[:3])}); "
        if src is None:
            raise InputError(message + "none in the transformers layout (pytorch_model*.bin).",
                             hint="Use a repo with safetensors weights" + (f": use {pr} (adds safetensors)." if pr else "."))
        message += "hf-metagpt does not unpickle files unless told to."
        if pr:
            message += f" use {pr} (adds safetensors)."
        raise InputError(message, hint=("Or pass" if pr else "Pass") + " --allow-pickle (recipe key allow_pickle) to "
                         "convert them to safetensors with torch's weights-only loader (a pickle that would run "
                         "code is still refused).")
    return replace(provisional_info(ref, _remote_config(remote, token), replace(src, conversion_pr=pr)),
                   files=dict(remote.files))


def _remote_adapter_info(remote: RemoteModel, token: str | None) -> ModelInfo:
    """A PEFT LoRA adapter repo: fetch its config and weights at the pinned commit, read them with peft.

    Adapters are small (their rank-r factors), so both files come whole at plan time and stay in
    the Hub cache; the merge reads them from there.
    """
    from huggingface_hub import snapshot_download

    from .lora import load_adapter_info

    ref = remote.ref
    if ADAPTER_WEIGHTS not in remote.files:
        if ADAPTER_PICKLE in remote.files:
            raise InputError(f"{ref.display}: only a pickle adapter ({ADAPTER_PICKLE}) on the Hub; hf-metagpt "
                             f"never unpickles files.",
                             hint="Re-save it with peft in a trusted environment (save_pretrained(out, "
                                  "safe_serialization=True)) and push the safetensors version.")
        raise InputError(f"{ref.display}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} at {ref.sha}.",
                         hint="Push the complete PEFT adapter folder (save_pretrained output).")
    folder = call(ref.display, snapshot_download, ref.repo_id, revision=ref.sha,
                   allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS], token=tok(token))
    return replace(load_adapter_info(ref, Path(folder)), files=dict(remote.files))


def _cached_headers(remote: RemoteModel, token: str | None) -> tuple[dict[str, TensorMeta], list[str]] | None:
    """Headers from shards already in the Hub cache at this commit (a rerun reads nothing remote)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    ref = remote.ref
    if INDEX_FILE in remote.files:
        if try_to_load_from_cache(ref.repo_id, INDEX_FILE, revision=ref.sha) is None:
            return None
        # At a commit SHA a cached file is returned without any request.
        index_path = Path(hf_hub_download(ref.repo_id, INDEX_FILE, revision=ref.sha, token=tok(token)))
        try:
            index = json.loads(index_path.read_text())
            files = weight_files_from_index(index, ref.display)
        except ValueError:
            return None
    else:
        files = [SINGLE_FILE]
    paths = {f: try_to_load_from_cache(ref.repo_id, f, revision=ref.sha) for f in files}
    if not all(isinstance(p, str) for p in paths.values()):
        return None
    tensors: dict[str, TensorMeta] = {}
    for f, p in paths.items():
        for name, meta in read_header(Path(p), f).items():
            if name in tensors:
                raise InputError(f"{ref.display}: tensor {name!r} is stored twice ({tensors[name].file}, {f}).")
            tensors[name] = meta
    if INDEX_FILE in remote.files:
        check_index(index, ref.display, tensors)
    log.debug("%s: headers read from the Hub cache", ref.display)
    return tensors, files


@dataclass(frozen=True)
class License:
    """A custom licence of an input's card: `license: other` with the `license_name` and
    `license_link` the Hub asks for (the link made absolute for a Hub input: it named a file of *that* repo)."""

    name: str
    link: str | None = None

    def __str__(self) -> str:
        return f"other ({self.name})"


def _card_license(path: Path, ref: ModelRef | None = None) -> "str | License | None":
    from huggingface_hub import ModelCard

    data = ModelCard.load(path, ignore_metadata_errors=True).data
    lic = data.license
    if not isinstance(lic, str):
        return None
    name, link = getattr(data, "license_name", None), getattr(data, "license_link", None)
    if lic == "other" and isinstance(name, str) and name.strip():
        link = link if isinstance(link, str) and link.strip() else None
        if link and "://" not in link:  # a file of the input's repo: a link into that repo, or none for a folder
            from huggingface_hub import constants

            link = (f"{constants.ENDPOINT.rstrip('/')}/{ref.repo_id}/blob/{ref.sha or 'main'}/{link.lstrip('./')}"
                    if ref is not None and ref.repo_id else None)
        return License(name.strip(), link)
    return lic


def read_license(ref: ModelRef, files: dict[str, int | None], token: str | None = None) -> "str | License | None":
    """The `license:` of a Hub model's card at its pinned commit (None when it has none); a custom
    licence (`other` with a `license_name`) as a `License`."""
    if ref.repo_id is None or "README.md" not in files:
        return None
    from huggingface_hub import hf_hub_download

    try:
        path = call(ref.display, hf_hub_download, ref.repo_id, "README.md", revision=ref.sha, token=tok(token))
        return _card_license(Path(path), ref)
    except Exception as exc:  # a broken card must not stop a merge; the card says "unknown"
        log.debug("could not read the card of %s: %s", ref.display, exc)
        return None


def local_license(folder: Path | None) -> "str | License | None":
    if folder is None or not (folder / "README.md").is_file():
        return None
    try:
        return _card_license(folder / "README.md")
    except Exception:
        return None


# ---------------------------------------------------------------- downloads


def remote_files(info: ModelInfo) -> dict[str, int | None]:
    """A Hub input's file listing at its pinned commit (empty for a local input)."""
    return dict(info.files or {})


def cached_path(info: ModelInfo, file: str) -> Path | None:
    """The file from the Hub cache at the pinned commit, if it is there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(info.ref.repo_id, file, revision=info.ref.sha)
    return Path(got) if isinstance(got, str) else None


# ---------------------------------------------------------------- push


def hub_url(ref: ModelRef) -> str:
    """A browsable link to a pinned Hub reference (on the configured endpoint)."""
    from huggingface_hub import constants

    base = constants.ENDPOINT.rstrip("/")
    return f"{base}/{ref.repo_id}/tree/{ref.sha}" if ref.sha else f"{base}/{ref.repo_id}"


