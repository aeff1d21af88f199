"""What differs between operating systems, in one place (POSIX-only modules are imported here only)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def disk_free(path: Path) -> tuple[Path, int]:
    """The nearest existing folder at or above `path` (the current folder when none is) and the free
    bytes of its file system: where a file written under `path` would land, before `path` exists."""
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    return probe, shutil.disk_usage(probe).free


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (0 when the platform cannot say).

    POSIX: `resource.getrusage` (ru_maxrss is KiB on Linux, bytes on macOS). Elsewhere (Windows has
    no `resource` module): psutil's peak working set, or the current RSS where no peak is kept.
    """
    try:
        import resource
    except ImportError:
        resource = None  # type: ignore[assignment]
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    try:
        import psutil
    except ImportError:
        return 0
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)


def page_cached(fd: int, offset: int) -> bool | None:
    """Whether the page at `offset` of an open file is in the page cache: a non-blocking 1-byte read
    (Linux `RWF_NOWAIT`); None where the platform or the file system cannot tell."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    try:
        return os.preadv(fd, [bytearray(1)], offset, flag) > 0
    except BlockingIOError:
        return False
    except OSError:
        return None
