"""Where each input file is on disk during a merge: local folders, or Hub shards fetched for the plan
(all at once, overlapped with the merge on threads, or one group ahead with `--low-disk`)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, TimeoutError
from pathlib import Path
from typing import Protocol

from ..sources.hub import BASE_SIDE_FILES, SIDE_FILES, cached_path, remote_code_files, remote_files
from .._platform import disk_free
from .._progress import StageBar, file_bar_class
from ..errors import DownloadStopped, OutputError
from ..sources.hub_calls import call, call_until, stop_xet_transfers, tok
from ..sources.chat_template import TEMPLATE_FILES
from ..sources.local import INDEX_FILE, TOKENIZER_FILES
from ..sources.model import ModelInfo
from .plan import MergePlan

log = logging.getLogger(__name__)


def needed_files(plan: "MergePlan", index: int, *, weights: bool = True, weight_index: bool | None = None) -> list[str]:
    """Files of input `index` the merge needs: shards, index, config, and the side files it copies.

    `weight_index` (default: as `weights`) adds the shard index: it lets a later plan read the headers
    from the Hub cache, so the overlapped mode fetches it with the side files.
    """
    info = plan.inputs[index]
    remote = set(remote_files(info))
    want: list[str] = list(SIDE_FILES)
    if weights:
        want += info.weight_files
    if (weights if weight_index is None else weight_index) and INDEX_FILE in remote:
        want.append(INDEX_FILE)
    if index == 0:
        want += [*BASE_SIDE_FILES, *remote_code_files(info.config)]  # the custom code the config names
    if index == plan.tokenizer_source:
        want += TOKENIZER_FILES
    else:  # where the output's chat template may come from (sources/chat_template.py)
        want += TEMPLATE_FILES
    return [f for f in dict.fromkeys(want) if f in remote]


def download_bytes(plan: "MergePlan", low_disk: bool = False) -> tuple[int, int]:
    """(bytes to download, of which the largest single need in low-disk mode) for the Hub inputs."""
    total = 0
    peak = 0
    for i, info in enumerate(plan.inputs):
        if not info.ref.is_hub:
            continue
        sizes = remote_files(info)
        if info.provisional:  # pickle weights, not converted yet: their .bin shards come first
            bins = [sizes.get(f) or 0 for f in info.pickle.bin_files]
            total += sum(bins)
            peak = max([peak, *bins])
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
    _, free = disk_free(Path(constants.HF_HUB_CACHE))
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
    cache_probe, cache_free = disk_free(Path(constants.HF_HUB_CACHE))
    out_probe, out_free = disk_free(target)
    # Low-disk keeps a few shards per model (the current group's and one prefetched).
    need_dl = (largest * 3 * len(plan.inputs)) if low_disk else total
    same_fs = cache_probe.stat().st_dev == out_probe.stat().st_dev
    checks = [(out_probe, out_free, write + (need_dl if same_fs or low_disk else 0))]
    if not same_fs and not low_disk:
        checks.append((cache_probe, cache_free, need_dl))
    for where, free, need in checks:
        if need > free:
            raise OutputError(
                f"Not enough disk space: {need / 1e9:.2f} GB needed under {where}, {free / 1e9:.2f} GB free.",
                hint="Free some space, point HF_HOME/HF_HUB_CACHE elsewhere, or use --low-disk "
                     "(shards are fetched as needed and deleted after use).")


def download(plan: "MergePlan", token: str | None = None, *, weights: bool = True,
             weight_index: bool | None = None) -> "MergePlan":
    """Fetch what each Hub input needs, pinned to its SHA; the plan with each Hub input's snapshot folder.

    A second merge of the same inputs finds everything in the Hub cache and downloads nothing.
    With `weights=False` only the side files come (`OverlappedFiles` and `LowDiskFiles` fetch the
    shards while the merge runs); `weight_index` as in `needed_files`. The given plan is unchanged.
    Every file of every input is fetched by `hf_hub_download` on a few threads (as
    `snapshot_download` does), all under one "download" bar.
    """
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import hf_hub_download

    wanted = {i: needed_files(plan, i, weights=weights, weight_index=weight_index)
              for i, info in enumerate(plan.inputs) if info.ref.is_hub}
    if not wanted:
        return plan
    total = sum(remote_files(plan.inputs[i]).get(f) or 0 for i, files in wanted.items() for f in files
                if cached_path(plan.inputs[i], f) is None)
    stage = StageBar("download", total) if total else None
    bar = file_bar_class(stage, None)

    def fetch(i: int, file: str) -> Path:
        info = plan.inputs[i]
        return Path(call(info.name, hf_hub_download, info.ref.repo_id, file, revision=info.ref.sha,
                         token=tok(token), tqdm_class=bar))

    done = False
    try:
        with ThreadPoolExecutor(max_workers=SNAPSHOT_WORKERS, thread_name_prefix="hf-metagpt-fetch") as pool:
            futures = {(i, f): pool.submit(fetch, i, f) for i, files in wanted.items() for f in files}
            try:
                paths = {key: fut.result() for key, fut in futures.items()}
            except BaseException:
                for fut in futures.values():
                    fut.cancel()
                raise
        done = True
    finally:
        if stage is not None:
            stage.close(complete=done)
    inputs = []
    for i, info in enumerate(plan.inputs):
        if i in wanted:
            info = info.at(_snapshot_folder(info, wanted[i], paths, i, token))
        inputs.append(info)
    return plan.with_inputs(inputs)


#: files fetched at a time by `download` (snapshot_download's default)
SNAPSHOT_WORKERS = 8


def _snapshot_folder(info: ModelInfo, files: list[str], paths: dict[tuple[int, str], Path], i: int,
                     token: str | None) -> Path:
    """The snapshot folder (`.../snapshots/SHA`) the fetched files lie in."""
    from pathlib import PurePosixPath

    if files:
        first = files[0]
        return paths[(i, first)].parents[len(PurePosixPath(first).parts) - 1]
    from huggingface_hub import snapshot_download

    from .._logging import bars_off

    with bars_off(True):  # nothing to fetch: the folder only (config.json is always needed, so rare)
        return Path(call(info.name, snapshot_download, info.ref.repo_id, revision=info.ref.sha,
                         allow_patterns=[], token=tok(token)))


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


#: name prefix of the threads that download shards (the progress hook raises only on them)
DOWNLOAD_THREADS = "hf-metagpt-download"


#: shard downloads at a time in the default mode: about what snapshot_download runs (8), fewer so
#: the files the first groups need are not slowed down by later ones sharing the bandwidth.
OVERLAP_WORKERS = 4


#: how much lower the download threads' CPU priority is (Linux `nice` of the thread; 0: as the merge).
#: A merge whose downloads take the CPU falls behind them and then runs mostly after the last one:
#: the merge, which waits on the downloads, should get the CPU first and keep pace.
DOWNLOAD_NICE = 10


def _download_thread_init() -> None:
    """Set up a download thread: lower its CPU priority (the stage bar has its own lock)."""
    if DOWNLOAD_NICE and sys.platform == "linux":  # a thread is a task on Linux; elsewhere a pid is meant
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + DOWNLOAD_NICE))
        except OSError:
            pass


def _stoppable_bar(stop: threading.Event, stage: StageBar | None = None) -> type:
    """A `tqdm_class` for `hf_hub_download` feeding `stage` (no bar of its own), raising
    `DownloadStopped` once `stop` is set.

    `hf_hub_download` has no way to be cancelled; over HTTP the progress update it makes for every
    piece it writes is the one hook inside the transfer, so a closed provider ends its running
    downloads within a piece (Xet downloads are cancelled by `close`, see `stop_xet_transfers`). What is lost (measured with huggingface_hub 2.4,
    tests/sources/test_hub_real.py): a connection lost mid-file is resumed by the client itself with a
    Range request from its last whole 10 MiB piece, but a download that ends with an error (this
    stop, a kill, an HTTP error on the resume) deletes its uniquely named partial file, and the next
    download of that shard starts again from byte 0.
    """
    return file_bar_class(stage, stop)


class DownloadPool:
    """A few daemon threads running downloads, with `submit` and `shutdown` like ThreadPoolExecutor.

    Hand-written because ThreadPoolExecutor's threads are joined when the interpreter exits: a
    download blocked in an HTTP request (a slow or stalled Hub) would then hold up the exit of a
    merge that already failed or was interrupted, for as long as that request takes. These
    threads stop at their next chance once the provider is closed, and never delay the exit.
    """

    def __init__(self, workers: int, name: str, initializer=None, initargs: tuple = ()) -> None:
        import queue

        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, args=(initializer, initargs), daemon=True,
                                          name=f"{name}_{k}") for k in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def _work(self, initializer, initargs: tuple) -> None:
        if initializer is not None:
            initializer(*initargs)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """Stop the threads once their current call returns; `wait` up to `timeout` s (None: as long as it takes)."""
        if cancel_futures:
            import queue

            pending = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item[0])
            for fut in pending:
                fut.cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class OverlappedFiles:
    """A `FileProvider` that downloads the Hub shards into the Hub cache while the merge runs.

    Downloading everything before merging puts the merge's own time on top of the download's.
    Here every shard missing from the cache is queued at once, in `walk_order`, on a few threads;
    `path` waits only for the file the merge asks for, so group k is merged while the shards of
    later groups are still arriving. Files go to the normal Hub cache at the pinned SHA (a second
    merge downloads nothing) and are never deleted; cached files and local inputs are used in
    place. A failed download (after `call`'s retries) is raised by the next `path` call, whichever
    file it asks for, and no further download starts. `close` stops everything.
    """

    sequential = False

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
        missing = []
        for key in self.order:
            info = plan.inputs[key[0]]
            if not info.ref.is_hub or info.weights_dir is not None:  # local, or converted pickle shards
                continue
            got = cached_path(info, key[1])
            if got is not None:
                self._ready[key] = got
            else:
                missing.append(key)
        # one bar over every missing shard's bytes (the sizes from the Hub's listing), not one per file
        total = sum(remote_files(plan.inputs[i]).get(f) or 0 for i, f in missing)
        self._stage = StageBar("download shards", total) if missing else None
        self._missing = len(missing)
        self._bar = _stoppable_bar(self._stop, self._stage)
        self._pool = DownloadPool(workers, DOWNLOAD_THREADS, initializer=_download_thread_init)
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
            path = Path(call_until(self._stop, info.name, hf_hub_download, info.ref.repo_id, file,
                                    revision=info.ref.sha, token=tok(self.token), tqdm_class=self._bar))
        except BaseException as exc:
            if self._stop.is_set() and not isinstance(exc, DownloadStopped):
                # cancelled (an aborted Xet transfer raises its own error): the stop is the news
                raise DownloadStopped(f"{info.name}: download of {file} stopped (the merge ended).") from None
            with self._lock:
                if self._error is None and not isinstance(exc, DownloadStopped):
                    self._error = exc
            self._stop.set()  # the merge cannot finish: start nothing more
            raise
        with self._lock:
            self.downloads += 1
            self._ready[(i, file)] = path
            last = self.downloads == self._missing
        if last:
            self._close_stage(complete=True)
        log.debug("downloaded %s of %s", file, info.name)
        return path

    def _close_stage(self, complete: bool = False) -> None:
        with self._lock:
            stage, self._stage = self._stage, None
        if stage is not None:
            stage.close(complete=complete)

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
        if info.weights_dir is not None:
            return info.weights_dir / file
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
            # Wait for this file, but not past another download's failure (a 403 on one shard
            # ends the merge now, not when this file's own request gives up).
            while True:
                try:
                    return fut.result(timeout=0.2)
                except TimeoutError:
                    self._raise_failure()
                    if self._stop.is_set():
                        raise DownloadStopped(f"{info.name}: download of {file} stopped (the merge ended).") from None
        except (DownloadStopped, CancelledError):
            self._raise_failure()  # stopped because another file failed: that failure is the news
            raise DownloadStopped(f"{info.name}: download of {file} stopped (the merge ended).") from None

    def release(self, model_index: int, info: ModelInfo, file: str) -> None:
        """Nothing to do: the files stay in the Hub cache for the next merge."""

    def close(self, timeout: float | None = None) -> None:
        """Cancel queued downloads and end running ones at their next chunk; wait for the threads up
        to `timeout` s (a failed or interrupted merge gives one: a request stalled on the network
        must not hold it up; its daemon thread ends with the request)."""
        self._stop.set()
        with self._lock:
            running = [f for f in self._futures.values() if f.running()]
        if running:
            stop_xet_transfers()
        self._pool.shutdown(wait=True, cancel_futures=True, timeout=timeout)
        self._close_stage()


class LowDiskFiles:
    """A `FileProvider` that fetches Hub shards as the layer walk needs them and deletes them after.

    Shards are requested in `plan.groups` order; when one is asked for, the next shard in that order
    is fetched on a background thread. A shard this provider fetched is deleted once the merger
    releases it (after the last group of the pass that reads it); shards already in the Hub cache
    and local inputs are used in place and never deleted. Converted pickle shards (`sources.pickle`)
    are deleted after use too, and converted again from their `.bin` when a later pass needs them. Peak disk is about the current group's
    shards plus one prefetched, per model.
    """

    #: reads must follow plan order (shards are fetched just ahead and deleted after)
    sequential = True

    def __init__(self, plan: "MergePlan", scratch: Path, token: str | None = None) -> None:
        self.plan = plan
        self.scratch = Path(scratch)
        self.token = token
        self.order = walk_order(plan)
        self._pool = DownloadPool(1, "hf-metagpt-prefetch")
        self._lock = threading.Lock()
        self._fetching: dict[tuple[int, str], Future] = {}
        self._fetched: dict[tuple[int, str], Path] = {}
        self.downloads = 0
        self.peak_bytes = 0
        self._stage: StageBar | None = None  # one bar over every shard fetched, opened at the first

    def _bar(self) -> type:
        with self._lock:
            if self._stage is None:  # the total grows as each download starts (shards come back in pass 2)
                self._stage = StageBar("download shards")
            return file_bar_class(self._stage, None)

    def _local(self, i: int, file: str) -> Path | None:
        info = self.plan.inputs[i]
        if info.weights_dir is not None:
            return None  # converted pickle shards: converted again when missing, deleted after use
        if not info.ref.is_hub:
            return info.ref.local_path / file if info.ref.local_path else None
        return cached_path(info, file)

    def _fetch(self, i: int, file: str) -> Path:
        from huggingface_hub import hf_hub_download

        info = self.plan.inputs[i]
        dest = self.scratch / str(i)
        if info.weights_dir is not None:
            from ..sources.pickle import ensure_converted, source_file

            path = ensure_converted(info.pickle, source_file(info.pickle, file), info.weights_dir, self.token,
                                    tqdm_class=self._bar())
        else:
            path = Path(call(info.name, hf_hub_download, info.ref.repo_id, file, revision=info.ref.sha,
                              local_dir=dest, token=tok(self.token), tqdm_class=self._bar()))
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

    def close(self, timeout: float | None = None) -> None:
        """Wait for any prefetch (up to `timeout` s when the merge failed) and remove the scratch folder."""
        with self._lock:
            futs = list(self._fetching.values())
            self._fetching.clear()
        if timeout is not None and any(f.running() for f in futs):
            stop_xet_transfers()  # a failed merge: a Xet prefetch would otherwise run to its end
        for f in futs:
            try:
                f.result(timeout=timeout)
            except Exception:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True, timeout=timeout)
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        shutil.rmtree(self.scratch, ignore_errors=True)


class FileProvider(Protocol):
    """Where a model's weight file is on disk: in place (`LocalFiles`), or downloaded on demand.

    A provider with `sequential = True` must be read in plan order (the low-disk one fetches just
    ahead and deletes behind); others may be read in any order.
    """

    sequential: bool

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path: ...

    def release(self, model_index: int, info: ModelInfo, file: str) -> None: ...

    def close(self, timeout: float | None = None) -> None:
        """Stop any download (waiting up to `timeout` s for running ones) and remove scratch files."""


class LocalFiles:
    """Files already on disk under each model's `local_path`."""

    sequential = False

    def path(self, model_index: int, info: ModelInfo, file: str) -> Path:
        assert info.files_dir is not None, f"{info.name} has no local files"
        return info.files_dir / file

    def release(self, model_index: int, info: ModelInfo, file: str) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass
