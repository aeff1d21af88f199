"""One progress bar per stage (the downloads of a stage, an upload), not one per file.

huggingface_hub draws a bar for every file it moves. Its hook for downloads is `hf_hub_download`'s
`tqdm_class`: its own `snapshot_download` passes a class whose instances feed one shared bar (its
`_AggregatedTqdm`), and `StageBar.file_class` is that class for a bar of ours, over every byte of a
stage's files, whichever model and thread they come from. Uploads have no such hook: `push` turns
huggingface_hub's bars off while it commits (`disable_progress_bars`, its switch) and its files
report what they read (`counting_add`), which is what huggingface_hub's own upload bars measure.

Bars are huggingface_hub's `tqdm`, so `disable_progress_bars()`, `HF_HUB_DISABLE_PROGRESS_BARS`, `-q`
and `progress=False` turn them off like every other bar.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import DownloadStopped


class StageBar:
    """One byte bar for a stage. `total` known up front (the files' sizes from the Hub listing), or
    None: grown by each file's size as its download starts (as snapshot_download's bar does)."""

    def __init__(self, desc: str, total: int | None = None) -> None:
        from huggingface_hub.utils import tqdm

        self._lock = threading.Lock()
        self._grow = total is None
        self.bar = tqdm(desc=desc, total=total if total else None, unit="B", unit_scale=True, leave=True)

    def update(self, n: float | None) -> None:
        with self._lock:
            self.bar.update(n or 0)

    def add_total(self, n: int) -> None:
        if self._grow and n:
            with self._lock:
                self.bar.total = (self.bar.total or 0) + n
                self.bar.refresh()

    def close(self, complete: bool = False) -> None:
        """End the bar; `complete`: the stage finished, so show it full (files the Hub already had,
        or sent by a transfer that reports no bytes, count as done)."""
        with self._lock:
            if complete and self.bar.total and self.bar.n < self.bar.total:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()

    def file_class(self, stop: threading.Event | None = None) -> type:
        """A `tqdm_class` for `hf_hub_download`: its progress goes into this bar, none of its own.

        With `stop`, an update made on the downloading thread once `stop` is set raises
        `DownloadStopped` (over HTTP, the one hook inside a transfer: see `fetch._stoppable_bar`).
        """
        return file_bar_class(self, stop)


def file_bar_class(stage: StageBar | None, stop: threading.Event | None) -> type:
    """`StageBar.file_class` of `stage`, or with no stage a `tqdm_class` that draws nothing (`stop` as there)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class FileBar(hf_tqdm):  # type: ignore[misc, valid-type]
        """Stands for one file's bar inside `hf_hub_download` (HTTP and Xet alike); draws nothing.

        A subclass of huggingface_hub's `tqdm`, so that it is handed the bar's `name` (which says Xet).
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if stop is not None and stop.is_set():
                # A download that reaches its transfer after `close`: over Xet, huggingface_hub
                # has just taken hf_xet's session, which is a *fresh* one when `close` aborted the
                # old one while this download was still at its HEAD request; nothing would stop
                # it then (measured: the whole transfer, 6 s of a slowed xorb, after the abort).
                # Its bar is made on this thread between taking the session and starting the
                # transfer: the last moment to stop it (over HTTP: before the first byte).
                self.disable = True  # what tqdm's __del__ looks at on a half-made bar
                raise DownloadStopped("download stopped before it began (the merge ended).")
            self._downloader = threading.get_ident()  # the thread running the download
            # huggingface_hub names the bars of a Xet download "huggingface_hub.xet_get[.transfer]"
            self._xet = str(kwargs.get("name") or "").startswith("huggingface_hub.xet_get")
            if stage is not None:
                stage.add_total(int(kwargs.get("total") or 0))
            initial = kwargs.get("initial") or 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.stage_n = 0
            if initial:
                self.update(initial)

        def update(self, n: float | None = 1) -> bool | None:
            # Over Xet, hf_xet calls this from inside its own code, which prints what is raised
            # here and goes on: `stop_xet_transfers` (in `close`) ends those downloads instead.
            if stop is not None and stop.is_set() and not self._xet and threading.get_ident() == self._downloader:
                raise DownloadStopped("download stopped (the merge ended).")
            self.stage_n += n or 0
            if stage is not None:
                stage.update(n)
            return None

        def update_transfer(self, n: float | None = 1) -> None:
            """Network bytes (Xet, HTTP): the stage counts the bytes written, as `update` gets them."""

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return FileBar


def counting_add(stage: StageBar) -> type:
    """A `CommitOperationAdd` whose file reports each read to `stage` (huggingface_hub's own upload
    bar, `tqdm_stream_file`, is a wrapper of `read` too); content given as bytes counts as well."""
    from contextlib import contextmanager

    from huggingface_hub import CommitOperationAdd

    class CountingAdd(CommitOperationAdd):
        _counted = 0  # each file counts once: a small file is read for the commit payload more than once

        @contextmanager
        def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:
            with super().as_file(with_tqdm=False) as file:
                read: Callable[..., bytes] = file.read

                def counted(size: int | None = -1) -> bytes:
                    data = read(size)
                    new = max(0, min(len(data), self.upload_info.size - self._counted))
                    if new:
                        self._counted += new
                        stage.update(new)
                    return data

                file.read = counted  # type: ignore[method-assign]
                try:
                    yield file
                finally:
                    file.read = read  # type: ignore[method-assign]

    return CountingAdd


def file_size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0
