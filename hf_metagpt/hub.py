"""The Hub side: resolve IDs to commit SHAs, read remote headers, download what is needed, push.

Every Hub reference is pinned to a commit SHA by `resolve` before anything else is read, and every
later call passes that SHA as the revision, so a commit pushed to a source repo mid-merge changes
nothing. Tokens come from `token=` or huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`)
and are only ever handed to huggingface_hub: never printed, logged or written.

Endpoint, cache and offline settings are huggingface_hub's own (`HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, ...); nothing here re-reads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, MergeError, OutputError
from .plan import (INDEX_FILE, PICKLE_PATTERNS, SINGLE_FILE, ModelInfo, check_index, safe_relative,
                   weight_files_from_index)
from .refs import ModelRef
from .safetensors_io import TensorMeta, parse_header_json, read_header

if TYPE_CHECKING:
    from .plan import MergePlan

log = logging.getLogger(__name__)

SIDE_FILES = ("config.json",)
# A PEFT adapter repo (kept in step with lora.py's names; importing lora here would load torch/peft early).
ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
BASE_SIDE_FILES = ("generation_config.json",)
# Kept in step with output.TOKENIZER_FILES (what the output folder receives).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


class HubAccessError(MergeError):
    """A Hub repo or revision cannot be read (missing, private, gated) or written."""


class HubUnavailableError(HubAccessError):
    """The Hub kept failing (5xx, timeouts, dropped connections) after every retry."""


# ---------------------------------------------------------------- retries
# What huggingface_hub retries by itself (2.4): preupload, LFS batch/upload/verify (5xx, 429,
# timeouts, network errors, with backoff), a file's HEAD once more with backoff when nothing is
# cached, and a dropped or timed-out file download (resumed with Range, 5 times). Not retried:
# model_info/repo_info, tree listings, the safetensors header Range reads, a 5xx on a file's GET,
# create_repo/create_branch and the commit POST itself. `_call` retries those, a few times with
# exponential backoff, and then says clearly what failed.

#: attempts after the first one
RETRIES = 4
#: environment variable: the first backoff delay in seconds (doubled after each failure)
RETRY_BASE_ENV = "HF_METAGPT_RETRY_BASE"
RETRY_BASE = 1.0
RETRY_MAX = 20.0
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def _retry_base() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_BASE_ENV) or RETRY_BASE))
    except ValueError:
        return RETRY_BASE


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub >= 2 talks through httpx2; older releases through httpx
        import httpx2 as httpx_mod  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover
        import httpx as httpx_mod  # type: ignore[no-redef]
    return (httpx_mod.TransportError,)


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying: 5xx/408/429 from the Hub, a timeout or a lost connection.

    The client sometimes wraps the cause (`snapshot_download` turns a failed listing into
    LocalEntryNotFoundError), so the chain of causes is searched too.
    """
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            return status in _RETRY_STATUS
        if isinstance(e, transport):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _failed_request(exc: BaseException) -> str:
    """'HTTP 503 on GET .../resolve/<sha>/model-00001.safetensors' (no query string, no secrets)."""
    from urllib.parse import unquote, urlsplit

    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            break
        response = getattr(e, "response", None)
        request = None
        try:
            request = getattr(e, "request", None) or getattr(response, "request", None)
        except RuntimeError:  # httpx raises when an error carries no request
            request = None
        if request is not None:
            path = unquote(urlsplit(str(request.url)).path)
            what = f"HTTP {response.status_code}" if response is not None else type(e).__name__
            return f"{what} on {request.method} {path}"
        e = e.__cause__ or e.__context__
    return type(exc).__name__


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="hf-metagpt")


def _hub_errors(ref_text: str, exc: Exception) -> MergeError | None:
    """Map huggingface_hub's typed errors to one-line messages that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return HubAccessError(f"{ref_text} is gated: your account has not been granted access.",
                              hint="Accept the model's conditions on its Hub page, then pass a token "
                                   "(--token, HF_TOKEN or `hf auth login`).")
    if isinstance(exc, RepositoryNotFoundError):
        return HubAccessError(f"{ref_text}: repository not found or private.",
                              hint="Check the ID; for a private repo log in (`hf auth login`), set HF_TOKEN "
                                   "or pass --token with read access.")
    if isinstance(exc, RevisionNotFoundError):
        return HubAccessError(f"{ref_text}: revision not found.",
                              hint="Use a branch, tag or commit SHA that exists in the repo (see its 'Files' tab).")
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return HubAccessError(f"{ref_text}: the Hub could not be reached and the files are not in the cache.",
                              hint="Check the connection and HF_ENDPOINT (and that HF_HUB_OFFLINE is not set), "
                                   "then retry.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubAccessError(f"{ref_text}: a file the repo lists is missing on the Hub.",
                              hint="The repo may have changed; retry, or pin a revision with @SHA.")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return HubAccessError(f"{ref_text}: access denied (HTTP {status}).",
                                  hint="Pass a token with the needed permission (--token, HF_TOKEN or `hf auth login`).")
        return HubAccessError(f"{ref_text}: the Hub answered HTTP {status}.", hint="Retry later; the request was not completed.")
    return None


def _call(ref_text: str, fn, *args, **kwargs):
    """Call huggingface_hub; retry transient failures with backoff; map errors to clear messages.

    Only for idempotent calls (reads, `create_repo(exist_ok=True)`, `create_branch(exist_ok=True)`).
    """
    return _call_until(None, ref_text, fn, *args, **kwargs)


class DownloadStopped(MergeError):
    """A background download was abandoned because its provider was closed (the merge ended)."""


def _call_until(stop: threading.Event | None, ref_text: str, fn, *args, **kwargs):
    """`_call` whose backoff waits end early, with `DownloadStopped`, once `stop` is set.

    A background download must not hold up the end of a failed merge for a 20 s backoff.
    """
    delay = _retry_base()
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except MergeError:
            raise
        except Exception as exc:
            if _transient(exc):
                if attempt < RETRIES:
                    log.warning("warning: %s: %s; retrying in %.1f s (%d/%d)", ref_text, _failed_request(exc),
                                delay, attempt + 1, RETRIES)
                    if stop is None:
                        time.sleep(delay)
                    elif stop.wait(delay):
                        raise DownloadStopped(f"{ref_text}: download stopped (the merge ended).") from None
                    delay = min(RETRY_MAX, delay * 2)
                    continue
                raise _gave_up(ref_text, exc) from None
            mapped = _hub_errors(ref_text, exc)
            if mapped is None:
                raise
            raise mapped from None
    raise AssertionError("unreachable")  # pragma: no cover


def _gave_up(ref_text: str, exc: BaseException, *, published: bool = False) -> HubUnavailableError:
    hint = "The Hub or the network is having trouble. Retry the same command later"
    hint += ("; nothing was published (a push is one commit)" if not published else "")
    hint += "; files already downloaded stay in the Hub cache and are not fetched again."
    if "GET" in _failed_request(exc) and "/" in ref_text:
        # `org/name` is also how a relative folder is written: a mistyped path lands here.
        hint += f" If {ref_text.split('@')[0]!r} was meant as a local folder: no such folder exists here."
    return HubUnavailableError(f"{ref_text}: the Hub kept failing after {RETRIES + 1} attempts "
                               f"({_failed_request(exc)}).", hint=hint)


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
    info = _call(ref.display, _api(token).model_info, ref.repo_id, revision=ref.revision, files_metadata=True)
    if not info.sha:
        raise HubAccessError(f"{ref.display}: the Hub gave no commit SHA for this revision.")
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    log.info("%s -> %s", ref.display, info.sha)
    return RemoteModel(replace(ref, sha=info.sha), files, bool(info.private))


def remote_info(remote: RemoteModel, token: str | None = None) -> ModelInfo:
    """Config and tensor headers of a resolved Hub model, from Range reads of the headers only."""
    from huggingface_hub import hf_hub_download

    ref = remote.ref
    name = ref.display
    if ADAPTER_CONFIG in remote.files and SINGLE_FILE not in remote.files and INDEX_FILE not in remote.files:
        return _remote_adapter_info(remote, token)
    if SINGLE_FILE not in remote.files and INDEX_FILE not in remote.files:
        pickles = sorted(f for f in remote.files if any(Path(f).match(p) for p in PICKLE_PATTERNS))
        if pickles:
            raise InputError(
                f"{name}: only pickle weights on the Hub ({', '.join(pickles[:3])}); hf-metagpt never unpickles files.",
                hint="Ask for (or open a PR with) a safetensors conversion, or convert it yourself in a "
                     "trusted environment with `save_pretrained(dir, safe_serialization=True)`.")
        raise InputError(f"{name}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) at {ref.sha}.",
                         hint="Is this a model repo (or a PEFT adapter repo with adapter_config.json)?")
    if "config.json" not in remote.files:
        raise InputError(f"{name}: no config.json at {ref.sha}.", hint="Merging needs a transformers model repo.")
    config_path = _call(name, hf_hub_download, ref.repo_id, "config.json", revision=ref.sha, token=_tok(token))
    try:
        config = json.loads(Path(config_path).read_text())
    except ValueError as exc:
        raise InputError(f"{name}: config.json is not valid JSON ({exc}).") from None

    cached = _cached_headers(remote, token)
    if cached is not None:
        tensors, files = cached
        return ModelInfo(ref=ref, config=config, tensors=tensors, weight_files=files)

    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    try:
        meta = _call(name, _api(token).get_safetensors_metadata, ref.repo_id, revision=ref.sha)
    except (NotASafetensorsRepoError, SafetensorsParsingError) as exc:
        raise InputError(f"{name}: cannot read its safetensors headers ({exc}).",
                         hint="The repo's weights are damaged or not safetensors.") from None
    tensors: dict[str, TensorMeta] = {}
    files = sorted({safe_relative(str(f), name) for f in meta.weight_map.values()})
    for file in files:
        fm = meta.files_metadata.get(file)
        if fm is None:
            raise InputError(f"{name}: shard {file} named in the index could not be read.")
        header = {t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                  for t, i in fm.tensors.items()}
        for tname, tm in parse_header_json(json.dumps(header).encode(), file).items():
            if meta.weight_map.get(tname, file) != file and meta.sharded:
                raise InputError(f"{name}: {INDEX_FILE} places {tname!r} in {meta.weight_map[tname]}, "
                                 f"but {file} holds it.", hint="The index is stale or damaged.")
            if tname in tensors:
                raise InputError(f"{name}: tensor {tname!r} is stored twice ({tensors[tname].file}, {file}).")
            tensors[tname] = tm
    missing = [t for t in meta.weight_map if t not in tensors]
    if missing:
        raise InputError(f"{name}: {INDEX_FILE} lists {missing[0]!r} but no shard holds it.",
                         hint="The index is stale or damaged.")
    return ModelInfo(ref=ref, config=config, tensors=tensors, weight_files=files)


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
    folder = _call(ref.display, snapshot_download, ref.repo_id, revision=ref.sha,
                   allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS], token=_tok(token))
    return load_adapter_info(ref, Path(folder))


def _cached_headers(remote: RemoteModel, token: str | None) -> tuple[dict[str, TensorMeta], list[str]] | None:
    """Headers from shards already in the Hub cache at this commit (a rerun reads nothing remote)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    ref = remote.ref
    if INDEX_FILE in remote.files:
        if try_to_load_from_cache(ref.repo_id, INDEX_FILE, revision=ref.sha) is None:
            return None
        # At a commit SHA a cached file is returned without any request.
        index_path = Path(hf_hub_download(ref.repo_id, INDEX_FILE, revision=ref.sha, token=_tok(token)))
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


def read_license(ref: ModelRef, files: dict[str, int | None], token: str | None = None) -> str | None:
    """The `license:` of a Hub model's card at its pinned commit (None when it has none)."""
    if ref.repo_id is None or "README.md" not in files:
        return None
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        path = _call(ref.display, hf_hub_download, ref.repo_id, "README.md", revision=ref.sha, token=_tok(token))
        lic = ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception as exc:  # a broken card must not stop a merge; the card says "unknown"
        log.debug("could not read the card of %s: %s", ref.display, exc)
        return None
    return lic if isinstance(lic, str) else None


def local_license(folder: Path | None) -> str | None:
    if folder is None or not (folder / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        lic = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.license
    except Exception:
        return None
    return lic if isinstance(lic, str) else None


def _tok(token: str | None) -> str | None:
    return token  # None: huggingface_hub's own sources (HF_TOKEN, the stored login)


# ---------------------------------------------------------------- downloads

def needed_files(plan: "MergePlan", index: int, *, weights: bool = True, weight_index: bool | None = None) -> list[str]:
    """Files of input `index` the merge needs: shards, index, config, and the side files it copies.

    `weight_index` (default: as `weights`) adds the shard index: it lets a later plan read the headers
    from the Hub cache, so the overlapped mode fetches it with the side files.
    """
    info = plan.inputs[index]
    remote = set(_remote_files(info))
    want: list[str] = list(SIDE_FILES)
    if weights:
        want += info.weight_files
    if (weights if weight_index is None else weight_index) and INDEX_FILE in remote:
        want.append(INDEX_FILE)
    if index == 0:
        want += BASE_SIDE_FILES
    if index == plan.tokenizer_source:
        want += TOKENIZER_FILES
    return [f for f in dict.fromkeys(want) if f in remote]


_REMOTE_FILES: dict[tuple[str, str], dict[str, int | None]] = {}


def _remote_files(info: ModelInfo) -> dict[str, int | None]:
    return _REMOTE_FILES.get((info.ref.repo_id or "", info.ref.sha or ""), {})


def remember_files(remote: RemoteModel) -> None:
    """Keep the file listing of a resolved commit (immutable, so safe to cache per process)."""
    _REMOTE_FILES[(remote.ref.repo_id or "", remote.ref.sha or "")] = dict(remote.files)


def cached_path(info: ModelInfo, file: str) -> Path | None:
    """The file from the Hub cache at the pinned commit, if it is there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(info.ref.repo_id, file, revision=info.ref.sha)
    return Path(got) if isinstance(got, str) else None


def download_bytes(plan: "MergePlan", low_disk: bool = False) -> tuple[int, int]:
    """(bytes to download, of which the largest single need in low-disk mode) for the Hub inputs."""
    total = 0
    peak = 0
    for i, info in enumerate(plan.inputs):
        if not info.ref.is_hub:
            continue
        sizes = _remote_files(info)
        for f in needed_files(plan, i, weights=True):
            if cached_path(info, f) is None:
                size = sizes.get(f) or 0
                total += size
                if f in info.weight_files:
                    peak = max(peak, size)
    return total, peak


def download_note(plan: "MergePlan") -> str:
    """One line for `hf-metagpt plan`: what a merge would download, and the free disk of the cache."""
    from huggingface_hub import constants

    total, largest = download_bytes(plan)
    cache = Path(constants.HF_HUB_CACHE)
    probe = next((p for p in [cache, *cache.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    line = (f"download {total / 1e9:.3f} GB from the Hub into the cache ({free / 1e9:.1f} GB free there); "
            f"--low-disk keeps about {3 * largest * len(plan.inputs) / 1e9:.3f} GB at a time")
    if total > free:
        line += " — NOT ENOUGH SPACE for a full download: use --low-disk or free some"
    return line


def check_disk(plan: "MergePlan", target: Path, low_disk: bool) -> None:
    """Refuse a merge whose downloads and output cannot fit on disk (before anything is fetched)."""
    from huggingface_hub import constants

    total, largest = download_bytes(plan, low_disk)
    write = plan.bytes_to_write
    cache = Path(constants.HF_HUB_CACHE)
    cache_probe = next((p for p in [cache, *cache.parents] if p.exists()), Path("."))
    out_probe = next((p for p in [target, *target.parents] if p.exists()), Path("."))
    # Low-disk keeps a few shards per model (the current group's and one prefetched).
    need_dl = (largest * 3 * len(plan.inputs)) if low_disk else total
    same_fs = cache_probe.stat().st_dev == out_probe.stat().st_dev
    checks = [(out_probe, write + (need_dl if same_fs or low_disk else 0))]
    if not same_fs and not low_disk:
        checks.append((cache_probe, need_dl))
    for where, need in checks:
        free = shutil.disk_usage(where).free
        if need > free:
            raise OutputError(
                f"Not enough disk space: {need / 1e9:.2f} GB needed under {where}, {free / 1e9:.2f} GB free.",
                hint="Free some space, point HF_HOME/HF_HUB_CACHE elsewhere, or use --low-disk "
                     "(shards are fetched as needed and deleted after use).")


def download(plan: "MergePlan", token: str | None = None, *, weights: bool = True,
             weight_index: bool | None = None) -> None:
    """Fetch what each Hub input needs, pinned to its SHA, and point its ref at the snapshot folder.

    A second merge of the same inputs finds everything in the Hub cache and downloads nothing.
    With `weights=False` only the side files come (`OverlappedFiles` and `LowDiskFiles` fetch the
    shards while the merge runs); `weight_index` as in `needed_files`.
    """
    from huggingface_hub import snapshot_download

    for i, info in enumerate(plan.inputs):
        if not info.ref.is_hub:
            continue
        files = needed_files(plan, i, weights=weights, weight_index=weight_index)
        folder = _call(info.name, snapshot_download, info.ref.repo_id, revision=info.ref.sha,
                       allow_patterns=files, token=_tok(token))
        info.ref = info.ref.with_local_path(Path(folder))


def walk_order(plan: "MergePlan") -> list[tuple[int, str]]:
    """(input index, weight file) in the order the layer walk first reads them.

    Group by group in `plan.groups` order, every model's files of a group before the next group's
    (the base reads integer buffers too; the fine-tunes only floating tensors). Adapters are left
    out: they were fetched whole into the Hub cache when the merge was planned.
    """
    order: dict[tuple[int, str], None] = {}
    for group in plan.groups:
        for i, info in enumerate(plan.inputs):
            if info.ref.is_adapter:
                continue
            for tp in group.tensors:
                if i == 0 or tp.floating:
                    order.setdefault((i, info.tensors[tp.name].file), None)
    return list(order)


#: shard downloads at a time in the default mode: about what snapshot_download runs (8), fewer so
#: the files the first groups need are not slowed down by later ones sharing the bandwidth.
OVERLAP_WORKERS = 4


#: how much lower the download threads' CPU priority is (Linux `nice` of the thread; 0: as the merge).
#: A merge whose downloads take the CPU falls behind them and then runs mostly after the last one:
#: the merge, which waits on the downloads, should get the CPU first and keep pace.
DOWNLOAD_NICE = 10


def _download_thread_init(bar: type, lock: object) -> None:
    """Set up a download thread: share the progress bars' lock (as snapshot_download's pool does), lower its CPU priority."""
    bar.set_lock(lock)  # type: ignore[attr-defined]
    if DOWNLOAD_NICE and sys.platform == "linux":  # a thread is a task on Linux; elsewhere a pid is meant
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + DOWNLOAD_NICE))
        except OSError:
            pass


def _stoppable_bar(stop: threading.Event) -> type:
    """huggingface_hub's progress-bar class, raising `DownloadStopped` once `stop` is set.

    `hf_hub_download` has no way to be cancelled; the progress update it makes for every chunk it
    writes is the one hook inside the transfer, so a closed provider ends its running downloads
    within a chunk. The partial blob stays in the cache as `.incomplete`; the next download resumes it.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class StoppableBar(hf_tqdm):  # type: ignore[misc, valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise DownloadStopped("download stopped (the merge ended).")
            return super().update(n)

    return StoppableBar


class OverlappedFiles:
    """A `FileProvider` that downloads the Hub shards into the Hub cache while the merge runs.

    Downloading everything before merging puts the merge's own time on top of the download's.
    Here every shard missing from the cache is queued at once, in `walk_order`, on a few threads;
    `path` waits only for the file the merge asks for, so group k is merged while the shards of
    later groups are still arriving. Files go to the normal Hub cache at the pinned SHA (a second
    merge downloads nothing) and are never deleted; cached files and local inputs are used in
    place. A failed download (after `_call`'s retries) is raised by the next `path` call, whichever
    file it asks for, and no further download starts. `close` stops everything.
    """

    def __init__(self, plan: "MergePlan", token: str | None = None, workers: int = OVERLAP_WORKERS) -> None:
        self.plan = plan
        self.token = token
        self.order = walk_order(plan)
        self.downloads = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready: dict[tuple[int, str], Path] = {}
        self._futures: dict[tuple[int, str], Future] = {}
        self._error: BaseException | None = None
        self._bar = _stoppable_bar(self._stop)
        missing = []
        for key in self.order:
            info = plan.inputs[key[0]]
            if not info.ref.is_hub:
                continue
            got = cached_path(info, key[1])
            if got is not None:
                self._ready[key] = got
            else:
                missing.append(key)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hf-metagpt-download",
                                        initializer=_download_thread_init,
                                        initargs=(self._bar, self._bar.get_lock()))
        for key in missing:
            self._futures[key] = self._pool.submit(self._fetch, *key)
        if missing:
            log.info("downloading %d shards from the Hub while merging", len(missing))

    def _fetch(self, i: int, file: str) -> Path:
        from huggingface_hub import hf_hub_download

        info = self.plan.inputs[i]
        try:
            if self._stop.is_set():
                raise DownloadStopped(f"{info.name}: download of {file} not started (the merge ended).")
            path = Path(_call_until(self._stop, info.name, hf_hub_download, info.ref.repo_id, file,
                                    revision=info.ref.sha, token=_tok(self.token), tqdm_class=self._bar))
        except BaseException as exc:
            with self._lock:
                if self._error is None and not isinstance(exc, DownloadStopped):
                    self._error = exc
            self._stop.set()  # the merge cannot finish: start nothing more
            raise
        with self._lock:
            self.downloads += 1
            self._ready[(i, file)] = path
        log.debug("downloaded %s of %s", file, info.name)
        return path

    def _raise_failure(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path:
        key = (model_index, file)
        self._raise_failure()
        with self._lock:
            ready = self._ready.get(key)
            fut = self._futures.get(key)
        if ready is not None:
            return ready
        if not info.ref.is_hub:
            assert info.ref.local_path is not None, f"{info.name} has no local files"
            return info.ref.local_path / file
        if fut is None:  # not in the walk order (an adapter's file): from the cache, else fetched now
            got = cached_path(info, file)
            if got is not None:
                return got
            with self._lock:
                fut = self._futures.get(key)
                if fut is None:
                    fut = self._futures[key] = self._pool.submit(self._fetch, *key)
        try:
            return fut.result()
        except (DownloadStopped, CancelledError):
            self._raise_failure()  # stopped because another file failed: that failure is the news
            raise DownloadStopped(f"{info.name}: download of {file} stopped (the merge ended).") from None

    def release(self, model_index: int, info: ModelInfo, file: str) -> None:
        """Nothing to do: the files stay in the Hub cache for the next merge."""

    def close(self) -> None:
        """Cancel queued downloads, end running ones within a chunk, and wait for every thread."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class LowDiskFiles:
    """A `FileProvider` that fetches Hub shards as the layer walk needs them and deletes them after.

    Shards are requested in `plan.groups` order; when one is asked for, the next shard in that order
    is fetched on a background thread. A shard this provider fetched is deleted once the merger
    releases it (after the last group of the pass that reads it); shards already in the Hub cache
    and local inputs are used in place and never deleted. Peak disk is about the current group's
    shards plus one prefetched, per model.
    """

    #: reads must follow plan order (shards are fetched just ahead and deleted after): see stream
    sequential = True

    def __init__(self, plan: "MergePlan", scratch: Path, token: str | None = None) -> None:
        self.plan = plan
        self.scratch = Path(scratch)
        self.token = token
        self.order = walk_order(plan)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-metagpt-prefetch")
        self._lock = threading.Lock()
        self._fetching: dict[tuple[int, str], Future] = {}
        self._fetched: dict[tuple[int, str], Path] = {}
        self.downloads = 0
        self.peak_bytes = 0

    def _local(self, i: int, file: str) -> Path | None:
        info = self.plan.inputs[i]
        if not info.ref.is_hub:
            return info.ref.local_path / file if info.ref.local_path else None
        return cached_path(info, file)

    def _fetch(self, i: int, file: str) -> Path:
        from huggingface_hub import hf_hub_download

        info = self.plan.inputs[i]
        dest = self.scratch / str(i)
        path = Path(_call(info.name, hf_hub_download, info.ref.repo_id, file, revision=info.ref.sha,
                          local_dir=dest, token=_tok(self.token)))
        with self._lock:
            self.downloads += 1
            self._fetched[(i, file)] = path
            self.peak_bytes = max(self.peak_bytes, sum(p.stat().st_size for p in self._fetched.values() if p.exists()))
        return path

    def _schedule(self, key: tuple[int, str]) -> Future | None:
        with self._lock:
            if key in self._fetched:
                return None
            fut = self._fetching.get(key)
            if fut is None:
                fut = self._fetching[key] = self._pool.submit(self._fetch, *key)
            return fut

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path:
        local = self._local(model_index, file)
        key = (model_index, file)
        if local is None:
            with self._lock:
                have = self._fetched.get(key)
            if have is None:
                fut = self._schedule(key)
                if fut is not None:
                    fut.result()
                with self._lock:
                    self._fetching.pop(key, None)
                    have = self._fetched[key]
            local = have
        self._prefetch_after(key)
        return local

    def _prefetch_after(self, key: tuple[int, str]) -> None:
        try:
            k = self.order.index(key)
        except ValueError:
            return
        for nxt in self.order[k + 1:]:
            if self._local(*nxt) is None:
                with self._lock:
                    busy = nxt in self._fetched or nxt in self._fetching
                if not busy:
                    self._schedule(nxt)
                return

    def release(self, model_index: int, info: ModelInfo, file: str) -> None:
        key = (model_index, file)
        with self._lock:
            fut = self._fetching.pop(key, None)
        if fut is not None:
            fut.result()
        with self._lock:
            path = self._fetched.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)
            log.debug("low-disk: deleted %s of %s", file, info.name)

    def close(self) -> None:
        """Wait for any prefetch and remove the scratch folder."""
        with self._lock:
            futs = list(self._fetching.values())
            self._fetching.clear()
        for f in futs:
            try:
                f.result()
            except Exception:
                pass
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


# ---------------------------------------------------------------- push

def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         create_pr: bool = False, revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a merged model folder to `repo_id` as one commit and return the URL to look at.

    The repo is created when missing (private if asked); `revision` names a branch (created from
    main when missing); `create_pr` opens a pull request instead of committing to the branch.

    Example:
        >>> push("merged/", "me/llama-2-7b-metagpt", private=True)
        'https://huggingface.co/me/llama-2-7b-metagpt'
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a model folder (no config.json).",
                         hint="Push the output folder of a merge.")
    api = _api(token)
    repo_url = _call(repo_id, api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        _call(f"{repo_id}@{revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
    message = commit_message or f"Upload MetaGPT merge ({folder.name}) with hf-metagpt"
    info = _upload_one_commit(api, repo_id, folder, message, revision, create_pr)
    if create_pr and not getattr(info, "pr_url", None):
        log.warning("warning: nothing changed since the last commit of %s: no pull request opened", repo_id)
    url = getattr(info, "pr_url", None) or str(repo_url)
    if revision and not getattr(info, "pr_url", None):
        url = f"{str(repo_url).rstrip('/')}/tree/{revision}"
    log.info("pushed %s to %s (commit %s)", folder, url, getattr(info, "oid", "?"))
    return url


def _upload_one_commit(api, repo_id: str, folder: Path, message: str, revision: str | None, create_pr: bool):
    """`upload_folder` as exactly one commit, retried on transient failures.

    The client retries preupload and LFS transfers itself, but not the commit POST. A retry here
    re-runs the whole upload (LFS objects already stored are skipped by the Hub). The commit is
    pinned to the branch head seen before the first attempt (`parent_commit`), so a commit whose
    answer was lost is found (the head moved to a commit with our message) instead of repeated.
    """
    ref_text = repo_id if not revision else f"{repo_id}@{revision}"
    head = None if create_pr else _call(ref_text, lambda: api.model_info(repo_id, revision=revision).sha)
    delay = _retry_base()
    for attempt in range(RETRIES + 1):
        try:
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                     revision=revision, create_pr=create_pr, parent_commit=head,
                                     ignore_patterns=[".cache/**", "*.tmp", ".hf-metagpt*"])
        except Exception as exc:
            if not _transient(exc):
                mapped = _hub_errors(ref_text, exc)
                if mapped is None:
                    raise
                raise mapped from None
            if head is not None:
                landed = _landed_commit(api, repo_id, revision, head, message)
                if landed is not None:
                    log.info("%s: the commit landed although its answer was lost", ref_text)
                    return landed
            if attempt >= RETRIES:
                raise _gave_up(ref_text, exc) from None
            log.warning("warning: %s: push failed (%s); retrying in %.1f s (%d/%d)", ref_text, _failed_request(exc),
                        delay, attempt + 1, RETRIES)
            time.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)
    raise AssertionError("unreachable")  # pragma: no cover


def _landed_commit(api, repo_id: str, revision: str | None, head: str, message: str):
    """What `push` needs of our commit (oid, url) if the branch moved from `head` to it; else None."""
    from types import SimpleNamespace

    try:
        commits = api.list_repo_commits(repo_id, revision=revision or "main")
    except Exception:
        return None
    if not commits or commits[0].commit_id == head or commits[0].title != message:
        return None
    if len(commits) < 2 or commits[1].commit_id != head:
        return None
    url = f"{str(api.endpoint).rstrip('/')}/{repo_id}/commit/{commits[0].commit_id}"
    return SimpleNamespace(commit_url=url, oid=commits[0].commit_id, pr_url=None)


def pushed_commit(repo_id: str, token: str | None = None, revision: str | None = None) -> str:
    """SHA of the head of `revision` of a repo (for messages and tests)."""
    return _call(repo_id, _api(token).model_info, repo_id, revision=revision).sha


def hub_url(ref: ModelRef) -> str:
    """A browsable link to a pinned Hub reference (on the configured endpoint)."""
    from huggingface_hub import constants

    base = constants.ENDPOINT.rstrip("/")
    return f"{base}/{ref.repo_id}/tree/{ref.sha}" if ref.sha else f"{base}/{ref.repo_id}"


def all_licenses(plan: "MergePlan", token: str | None = None) -> list[str | None]:
    """License of every input (base first), from their cards; None where unknown."""
    out = []
    for info in plan.inputs:
        if info.ref.is_hub:
            out.append(read_license(info.ref, _remote_files(info), token))
        else:
            out.append(local_license(info.ref.local_path))
    return out

