"""Reading requests with bounds: a socket reader with deadlines, and a body reader that refuses bad framing.

Every read of a connection goes through `SocketReader`, whose timeout depends on what is expected:
the next request of a kept-alive connection (``idle_timeout``), the rest of its headers once the
first byte came (one ``header_timeout`` for all of them, so a client dripping a byte at a time is cut
off: slowloris), or its body (``body_timeout`` per read, and at least ``min_body_rate`` on average after
``body_grace`` seconds: a slow body is cut off too). `BodyReader` refuses a negative, non-numeric,
repeated-and-different or over-limit Content-Length, both Content-Length and Transfer-Encoding,
malformed chunk sizes and chunks longer than announced, each with a 4xx before any use.
"""

from __future__ import annotations

import io
import re
import socket
import time
from typing import Any, BinaryIO

from .common import CHUNK, MAX_JSON_BODY, HubError, Limits

_DIGITS_RE = re.compile(r"[0-9]{1,18}")
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_MAX_TRAILERS = 64


class IncompleteBody(Exception):
    """The client went away before the end of its body: nothing to answer."""


class SocketReader(io.RawIOBase):
    """The read side of a connection, with the timeout of the phase the request is in."""

    def __init__(self, sock: socket.socket, limits: Limits):
        self._sock, self._limits = sock, limits
        self._phase, self._deadline = "idle", 0.0

    def readable(self) -> bool:
        return True

    def expect_request(self) -> None:
        """Wait for the next request: idle timeout, then one deadline for all its headers."""
        self._phase = "idle"

    def expect_body(self) -> None:
        """Headers are in: body reads (and the answer's writes) each get `body_timeout`, and the body
        as a whole must average `min_body_rate` after `body_grace` seconds (a byte every few seconds
        would pass any per-read timeout)."""
        self._phase = "body"
        self._body_start, self._body_bytes = time.monotonic(), 0
        self._sock.settimeout(self._limits.body_timeout)

    def readinto(self, buffer: Any) -> int:
        now = time.monotonic()
        if self._phase == "idle":
            self._sock.settimeout(self._limits.idle_timeout)
        elif self._phase == "headers":
            left = self._deadline - now
            if left <= 0:
                raise TimeoutError("request headers took too long")
            self._sock.settimeout(left)
        elif self._phase == "body":
            limits = self._limits
            left = self._body_start + limits.body_grace + self._body_bytes / limits.min_body_rate - now
            if left <= 0:
                raise TimeoutError("request body arrives too slowly")
            self._sock.settimeout(min(limits.body_timeout, left))
        n = self._sock.recv_into(buffer)
        if self._phase == "body":
            self._body_bytes += n
        if self._phase == "idle" and n:
            self._phase, self._deadline = "headers", now + self._limits.header_timeout
        return n


class BodyReader:
    """Reads a request body (Content-Length or chunked) in pieces, never all at once, never past `limit`."""

    def __init__(self, rfile: BinaryIO, headers: Any):
        self._rfile = rfile
        self._buf = bytearray()
        self._chunk_left = 0
        self._seen, self._limit = 0, MAX_JSON_BODY
        self.done = False  # until the framing is known to be sound: a refused body closes the connection
        encodings = headers.get_all("Transfer-Encoding") or []
        lengths = {v.strip() for v in headers.get_all("Content-Length") or []}
        if encodings and lengths:
            raise HubError(400, "A request may not carry both Content-Length and Transfer-Encoding")
        self._chunked = bool(encodings)
        if self._chunked and [e.strip().lower() for e in encodings] != ["chunked"]:
            raise HubError(400, "Only 'Transfer-Encoding: chunked' is supported")
        if len(lengths) > 1 or (lengths and not _DIGITS_RE.fullmatch(next(iter(lengths)))):
            raise HubError(400, "Invalid Content-Length: expected one non-negative integer")
        self.declared_length: int | None = None if self._chunked else int(next(iter(lengths), "0"))
        self._left = self.declared_length or 0
        self.done = not self._chunked and self._left == 0

    def limit(self, max_bytes: int) -> None:
        """Refuse (413) a body larger than `max_bytes`: at once if its Content-Length says so."""
        self._limit = max_bytes
        if self.declared_length is not None and self.declared_length > max_bytes:
            raise HubError(413, f"Request body too large (at most {max_bytes} bytes)")

    def _raw(self, n: int) -> bytes:
        if self.done:
            return b""
        data = self._raw_chunked(n) if self._chunked else self._raw_length(n)
        self._seen += len(data)
        if self._seen > self._limit:
            raise HubError(413, f"Request body too large (at most {self._limit} bytes)")
        return data

    def _raw_length(self, n: int) -> bytes:
        data = self._rfile.read(min(n, self._left))
        if not data:
            raise IncompleteBody("client went away mid-body")
        self._left -= len(data)
        self.done = self._left == 0
        return data

    def _raw_chunked(self, n: int) -> bytes:
        if self._chunk_left == 0:
            line = self._rfile.readline(1026)
            if not line:
                raise IncompleteBody("client went away mid-body")
            size = line.split(b";")[0].strip()
            if not line.endswith(b"\n") or not _HEX_RE.fullmatch(size):
                raise HubError(400, "Invalid chunk size line in a chunked body")
            self._chunk_left = int(size, 16)
            if self._chunk_left == 0:
                self._trailers()
                return b""
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise IncompleteBody("client went away mid-body")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            end = self._rfile.readline(3)
            if not end:
                raise IncompleteBody("client went away mid-body")
            if end not in (b"\r\n", b"\n"):
                raise HubError(400, "A chunk is longer than its announced size")
        return data

    def _trailers(self) -> None:
        for _ in range(_MAX_TRAILERS):
            line = self._rfile.readline(1026)
            if not line:
                raise IncompleteBody("client went away mid-body")
            if line in (b"\r\n", b"\n"):
                self.done = True
                return
        raise HubError(400, "Too many trailer lines after a chunked body")

    def read(self, n: int = -1) -> bytes:
        if self._buf:
            out = bytes(self._buf[: n if n >= 0 else None])
            del self._buf[: len(out)]
            return out
        if n < 0:
            return self.read_all(MAX_JSON_BODY)
        while not self.done:
            data = self._raw(n)
            if data:
                return data
        return b""

    def read_all(self, limit: int) -> bytes:
        self.limit(min(limit, self._limit))
        out = bytearray(self._buf)
        self._buf.clear()
        while not self.done:
            out += self._raw(CHUNK)
        return bytes(out)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buf and not self.done:
            if len(self._buf) > limit:
                raise HubError(413, "NDJSON line too long")
            self._buf += self._raw(CHUNK)
        i = self._buf.find(b"\n")
        end = len(self._buf) if i < 0 else i + 1
        if end > limit + 1:
            raise HubError(413, "NDJSON line too long")
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def drain(self) -> None:
        while not self.done:
            self._raw(CHUNK)
