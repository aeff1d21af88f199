"""Serving a stored blob's bytes: `Range` headers and the streamed (or sendfile) body.

Shared by the Hub's resolve answers (`reads`) and the CAS's xorb ranges (`cas`).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from .common import CHUNK, HubError
from .exchange import Exchange

log = logging.getLogger(__name__)


def stream_blob(h: Exchange, blob: Path, start: int, length: int, path: str) -> None:
    try:
        with open(blob, "rb") as f:
            cut = h.drop_after
            if cut is None and length:
                # Zero-copy (sendfile): the Python read/write loop cost a core on 2-core
                # machines, which a merge by ID running beside the download needs.
                h.wfile.flush()
                sent = h.connection.sendfile(f, start, length)
                if sent != length:
                    raise OSError(f"blob {blob.name} is shorter than recorded")
                return
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"blob {blob.name} is shorter than recorded")
                if cut is not None and len(chunk) >= cut:
                    h.wfile.write(chunk[:cut])
                    h.wfile.flush()
                    h.connection.shutdown(socket.SHUT_RDWR)
                    raise ConnectionResetError("injected fault: connection dropped mid-body")
                if cut is not None:
                    cut -= len(chunk)
                h.wfile.write(chunk)
                left -= len(chunk)
    except OSError as exc:
        # Headers are gone already: the only honest signal left is a short, closed response.
        h.close_connection = True
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            log.error("local hub: could not stream %s: %s", path, exc)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The first range of a `bytes=` header, clipped to the file; None to ignore the header.

    Raises a 416 `HubError` when the range starts past the end of the file.
    """
    unit, _, spec = header.partition("=")
    first = spec.split(",")[0].strip()
    a, _, b = first.partition("-")
    if unit.strip().lower() != "bytes" or not (a.isdigit() or b.isdigit()) or (b and not b.isdigit()):
        return None
    if a == "":
        start, end = max(0, size - int(b)), size - 1
        unsatisfiable = int(b) == 0 or size == 0
    else:
        start, end = int(a), (int(b) if b else max(size - 1, int(a)))
        if end < start:
            return None
        unsatisfiable = start >= size
    if unsatisfiable:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)
