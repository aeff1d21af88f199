"""Read the first bytes a merge will read into the page cache while the CLI is still starting.

A CLI merge spends its first seconds in the interpreter, `import torch` and the plan, with the
disk idle; on a cold cache the first reads start only after. `start` hands the disk that work
early: a daemon thread reads the inputs' first pieces, in the order the merge reads them (the
plan's stream order: embeddings, then the blocks by number, each block of every input in turn),
into the page cache, where the merge's reader then finds them (`reader.read_tensors_into` copies
cached runs instead of reading them again).

When: `wanted` — where the merge's copies out of the page cache cost nothing (two-pass merges read
pass 1 through it anyway) or little (8 cores or more); `HF_METAGPT_READAHEAD_MB` decides otherwise.
How much: `budget` bytes, a few GB at most (what a disk reads during the start-up) and a quarter
of the memory available, so a small machine is not pushed into evicting. Nothing here imports
torch (this runs before it is imported) and nothing here can fail a merge: every error only
loses the read-ahead. Linux only (`os.sendfile` to /dev/null fills the page cache without
copying; one `posix_fadvise(WILLNEED)` call reads only the device's read-ahead window).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .._platform import page_cached
from ..constants import READAHEAD_ENV, env
from ..safetensors_io import read_header
from ..sources.architecture import block_of, stream_order
from ..sources.local import local_weight_files

log = logging.getLogger(__name__)

#: Bytes read ahead by default: about what a disk reads while the CLI starts (1-2 GB/s for 2-3 s).
DEFAULT_BUDGET = 4 << 30
#: At most this share of MemAvailable is filled (the merge needs the rest).
MEMORY_SHARE = 4
#: No new read is started this many seconds after `start`: the merge reads by then.
DEADLINE_S = 20.0
#: Bytes per `sendfile` call (a thread stuck in one delays the process's exit by at most this read).
CHUNK = 64 << 20
#: Fewer cores than this: a one-pass merge reads ahead only when `HF_METAGPT_READAHEAD_MB` asks. It
#: then copies each cached byte out of the page cache instead of reading it with O_DIRECT; on 2 cores
#: that copy took CPU the merge needed when the disk was fast (0.9-5 s more system CPU per 4.3 GB,
#: 1-2 s more wall; 2026-12-04); from 8 cores several reader threads share it (`sizing.plan_workers`).
MIN_CORES = 8
#: Methods whose λ need every norm first: at `--granularity model` their pass 1 reads through the page
#: cache anyway, so reading its first pieces early costs no copy (`MergeMethod.uses_group_norms`).
NORM_METHODS = ("metagpt", "metagpt_dare", "metagpt_ties")

#: (file, first byte, end byte) of one tensor's data, offsets within the file
Extent = tuple[str, int, int]



@dataclass(frozen=True)
class Span:
    """Bytes [offset, offset + length) of one file, read in one go."""

    path: str
    offset: int
    length: int


def first_reads(inputs: Sequence[Mapping[str, Extent]], budget: int) -> list[Span]:
    """The first `budget` bytes a merge of these inputs reads, as spans in the order it reads them.

    Args:
        inputs: per input (the base first), each tensor's extent. The base's tensors set the
            order (as the plan's); a tensor an input lacks is not read from it.
        budget: bytes to cover; the last span is cut to fit.

    Returns:
        Spans group by group (a block, or a tensor outside the blocks), each input in turn; the
        extents of one input's group that lie back to back in a file are one span.
    """
    if not inputs or budget <= 0:
        return []
    groups: dict[str, list[str]] = {}
    for name in sorted(inputs[0], key=stream_order):
        groups.setdefault(block_of(name) or name, []).append(name)
    out: list[Span] = []
    left = budget
    for names in groups.values():
        for extents in inputs:
            for span in _coalesce(extents[n] for n in names if n in extents):
                if span.length > left:
                    span = Span(span.path, span.offset, left)
                out.append(span)
                left -= span.length
                if left <= 0:
                    return out
    return out


def _coalesce(extents: Iterable[Extent]) -> list[Span]:
    """Extents as spans, neighbours in one file joined (sorted by file and offset)."""
    out: list[Span] = []
    for path, lo, hi in sorted(e for e in extents if e[2] > e[1]):
        last = out[-1] if out else None
        if last is not None and last.path == path and last.offset + last.length == lo:
            out[-1] = Span(path, last.offset, hi - last.offset)
        else:
            out.append(Span(path, lo, hi - lo))
    return out


def budget(meminfo: str | None = None) -> int:
    """Bytes to read ahead: `HF_METAGPT_READAHEAD_MB` (0: none) or `DEFAULT_BUDGET`, at most a
    quarter of MemAvailable (`meminfo`: the text of /proc/meminfo, read when None)."""
    raw = env(READAHEAD_ENV)
    cap = DEFAULT_BUDGET
    if raw is not None:
        try:
            cap = max(0, int(float(raw) * (1 << 20)))
        except ValueError:
            log.debug("%s=%r is not a number of MiB: the default", READAHEAD_ENV, raw)
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return 0
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return min(cap, int(line.split()[1]) * 1024 // MEMORY_SHARE)
    return 0  # an unknown memory state: read nothing ahead


def folder_extents(folder: Path) -> dict[str, Extent]:
    """Every tensor's extent in a model folder's safetensors files, found and checked as the merge
    will (`sources.local.local_weight_files`, `safetensors_io.read_header`); an InputError where it
    would fail (no safetensors weights, an index naming a file outside the folder, a damaged header)."""
    out: dict[str, Extent] = {}
    for rel in local_weight_files(folder, folder.name)[0]:
        path = folder / rel
        metas = read_header(path, rel)
        if not metas:
            continue
        # read_header checked that the file ends with its last tensor: the data start follows
        start = path.stat().st_size - max(m.data_offsets[1] for m in metas.values())
        out.update((name, (str(path), start + m.data_offsets[0], start + m.data_offsets[1])) for name, m in metas.items())
    return out


def input_folder(spec: str) -> Path | None:
    """Where an input's weights are on disk now: a local folder, or a Hub ID's snapshot in the Hub
    cache (its revision's recorded commit); None when it is neither (never asks the network)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from ..sources.refs import parse_ref  # torch-free: names and paths only

    try:
        ref = parse_ref(spec)
    except Exception:  # noqa: BLE001 - a bad reference is the merge's to report
        return None
    if ref.repo_id is None:
        return None
    from huggingface_hub import constants  # its constants only: no HTTP client is imported

    repo = Path(constants.HF_HUB_CACHE) / ("models" + constants.REPO_ID_SEPARATOR
                                          + ref.repo_id.replace("/", constants.REPO_ID_SEPARATOR))
    revision = ref.revision or "main"
    sha = revision
    if not (len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)):
        recorded = repo.joinpath("refs", *revision.split("/"))
        if not recorded.is_file():
            return None
        sha = recorded.read_text().strip()
    snapshot = repo / "snapshots" / sha
    return snapshot if snapshot.is_dir() else None


def plan_spans(specs: Sequence[str], nbytes: int) -> list[Span]:
    """The spans to read ahead for these inputs (the base first); an input that cannot be read is left out."""
    inputs: list[dict[str, Extent]] = []
    for k, spec in enumerate(specs):
        try:
            folder = input_folder(str(spec))
            extents = folder_extents(folder) if folder is not None else {}
        except Exception as exc:  # noqa: BLE001 - the merge names what is wrong with an input
            log.debug("read-ahead skips %s: %s", spec, exc)
            extents = {}
        if k == 0 and not extents:
            return []  # the base sets the order
        inputs.append(extents)
    return first_reads(inputs, nbytes)


def read_spans(spans: Sequence[Span], deadline: float = float("inf")) -> int:
    """Read the spans into the page cache (none copied to this process); returns bytes read.

    A span whose middle page is cached already (a warm run) is skipped; no span is started
    after `deadline` (`time.monotonic()`).
    """
    done = 0
    with open(os.devnull, "wb") as null:
        for span in spans:
            if time.monotonic() > deadline:
                break
            fd = os.open(span.path, os.O_RDONLY)
            try:
                if page_cached(fd, span.offset + span.length // 2):
                    continue
                pos, end = span.offset, span.offset + span.length
                while pos < end:
                    n = os.sendfile(null.fileno(), fd, pos, min(CHUNK, end - pos))
                    if n <= 0:
                        break  # the file is shorter than its header says: the merge will say so
                    pos += n
                done += pos - span.offset
            finally:
                os.close(fd)
    return done


def _run(specs: Sequence[str], deadline: float) -> None:
    try:
        nbytes = budget()
        spans = plan_spans(specs, nbytes) if nbytes > 0 else []
        t0 = time.monotonic()
        done = read_spans(spans, deadline)
        log.debug("read ahead %.2f GB of %d inputs in %.2f s", done / 1e9, len(specs), time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - a read-ahead never fails a merge
        log.debug("read-ahead stopped: %s", exc)


def two_pass(method: str, granularity: str) -> bool:
    """The merge reads every piece twice, pass 1 through the page cache (MetaGPT's whole-model λ)."""
    return method in NORM_METHODS and granularity == "model"


def wanted(cores: int | None = None, cached_reads: bool = False) -> bool:
    """Read ahead here: on Linux, unless `HF_METAGPT_READAHEAD_MB=0`; by default from `MIN_CORES`
    cores, or on any machine when the merge's first reads go through the page cache anyway
    (`cached_reads`: `two_pass`); `cores`: os.cpu_count() when None."""
    if not sys.platform.startswith("linux") or not hasattr(os, "RWF_NOWAIT"):
        return False
    setting = env(READAHEAD_ENV)
    if setting is not None:
        return setting != "0"
    return cached_reads or (cores if cores is not None else os.cpu_count() or 1) >= MIN_CORES


def start(specs: Sequence[str], *, cached_reads: bool = False) -> threading.Thread | None:
    """Start reading the first bytes of a merge of `specs` (the base, then the fine-tunes) ahead, on
    a daemon thread that ends by itself; None where there is nothing to do (`wanted`)."""
    if not wanted(cached_reads=cached_reads):
        return None
    thread = threading.Thread(target=_run, args=(list(specs), time.monotonic() + DEADLINE_S),
                              name="hf-metagpt-readahead", daemon=True)
    thread.start()
    return thread
