"""HTTP plumbing of the local Hub: the threaded server, the request handler and the body reader.

The handler turns every request into one call of `routes.route` and every `HubError` into the Hub's
error answer (JSON ``{"error": ...}`` plus ``X-Error-*`` headers).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from .common import CHUNK, MAX_JSON_BODY, HubError
from .routes import route



class Hooks(Protocol):
    """What the handler needs from the server object (`server.LocalHub`), without importing it."""

    endpoint: str
    access: Any
    context: Any

    def record(self, h: "Handler", user: str | None, status: int | None) -> None: ...

    def apply_fault(self, h: "Handler") -> bool: ...

log = logging.getLogger(__name__)


class IncompleteBody(Exception):
    pass


class BodyReader:
    """Reads a request body (Content-Length or chunked) in pieces, never all at once."""

    def __init__(self, rfile: BinaryIO, headers):
        self._rfile = rfile
        self._chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        self._left = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._chunk_left = 0
        self.done = not self._chunked and self._left == 0
        self._buf = bytearray()

    def _raw(self, n: int) -> bytes:
        if self.done:
            return b""
        if not self._chunked:
            data = self._rfile.read(min(n, self._left))
            if not data:
                raise IncompleteBody("client went away mid-body")
            self._left -= len(data)
            self.done = self._left == 0
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            if not line:
                raise IncompleteBody("client went away mid-body")
            self._chunk_left = int(line.split(b";")[0].strip() or b"0", 16)
            if self._chunk_left == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return b""
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise IncompleteBody("client went away mid-body")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(16)  # CRLF after each chunk
        return data

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
        out = bytearray(self._buf)
        self._buf.clear()
        while not self.done:
            out += self._raw(CHUNK)
            if len(out) > limit:
                raise HubError(413, "Request body too large")
        return bytes(out)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buf and not self.done:
            if len(self._buf) > limit:
                raise HubError(413, "NDJSON line too long")
            self._buf += self._raw(CHUNK)
        i = self._buf.find(b"\n")
        end = len(self._buf) if i < 0 else i + 1
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def drain(self) -> None:
        while not self.done:
            self._raw(CHUNK)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, hub: Hooks):
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, Handler)

    def handle_error(self, request, client_address) -> None:
        # Clients that vanish mid-request (or faults that drop them) are routine here.
        log.debug("local hub: connection from %s ended with an error", client_address, exc_info=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-metagpt-local-hub/1"
    server: Server

    # Never log request lines or headers: they may carry tokens (and upload signatures in queries).
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.connections.discard(self.connection)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ---- request cycle
    def _handle(self) -> None:
        self._status: int | None = None
        self._rec: Any = None  # the RequestRecord the server keeps for this request
        self.drop_after: int | None = None
        self.body = BodyReader(self.rfile, self.headers)
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query, keep_blank_values=True)
        hub: Hooks = self.server.hub
        user: str | None = None
        try:
            user = hub.access.authenticate(self.headers.get("Authorization"))
            hub.record(self, user, None)
            if hub.apply_fault(self):
                return
            route(hub.context, self, user)
        except HubError as err:
            self.send_error_json(err)
        except IncompleteBody:
            self.close_connection = True
            log.debug("local hub: %s %s: incomplete request body", self.command, unquote(self.raw_path))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the server must not kill the connection silently
            log.exception("local hub: internal error on %s %s", self.command, unquote(self.raw_path))
            self.send_error_json(HubError(500, f"Internal error: {type(exc).__name__}"))
        finally:
            hub.record(self, user, self._status)
            if not self.body.done:
                self.close_connection = True  # unread body bytes would corrupt the next request

    def send_bytes(self, status: int, body: bytes = b"", headers: dict | None = None,
                   content_type: str = "application/json") -> None:
        self.send_head(status, len(body), headers, content_type)
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_head(self, status: int, length: int, headers: dict | None = None,
                  content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not self.body.done:
            self.send_header("Connection", "close")
        self.end_headers()

    def send_json(self, obj: Any, status: int = 200, headers: dict | None = None,
                  content_type: str = "application/json") -> None:
        self.send_bytes(status, json.dumps(obj).encode(), headers, content_type)

    def send_error_json(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        try:
            self.send_json({"error": err.message, **err.extra}, err.status, headers)
        except OSError:
            self.close_connection = True

    def json_body(self) -> Any:
        raw = self.body.read_all(MAX_JSON_BODY)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.endpoint
