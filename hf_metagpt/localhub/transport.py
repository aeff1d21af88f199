"""HTTP plumbing of the local Hub: the threaded server (connection cap, backlog) and the request handler.

The handler turns every request into one call of `routes.route` and every `HubError` into the Hub's
error answer (JSON ``{"error": ...}`` plus ``X-Error-*`` headers, made printable: nothing a client
sent reaches a header or a log line raw).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from .body import BodyReader, IncompleteBody, SocketReader
from .common import MAX_JSON_BODY, HubError, Limits, printable
from .routes import route
from .schema import parse_json


class Hooks(Protocol):
    """What the handler needs from the server object (`server.LocalHub`), without importing it."""

    endpoint: str
    access: Any
    context: Any

    def record(self, h: "Handler", user: str | None, status: int | None) -> None: ...

    def apply_fault(self, h: "Handler") -> bool: ...

log = logging.getLogger(__name__)

_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


class Server(ThreadingHTTPServer):
    """One thread per connection, at most `limits.max_connections` of them (`max_per_client` from one
    address); the rest get a 503.

    The server owns every thread it starts: `close_all` ends each connection and joins its thread.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], hub: Hooks, limits: Limits,
                 tls: ssl.SSLContext | None = None, router: Any = route, hub_tokens: bool = True):
        self.hub, self.limits, self.tls = hub, limits, tls
        self.router = router  # path -> endpoint: the Hub's API, or the storage side's (cas.route)
        self.hub_tokens = hub_tokens  # Authorization carries Hub tokens (the storage side checks its own)
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        self.connections: set[socket.socket] = set()
        self.workers: set[threading.Thread] = set()
        self.per_client: dict[str, int] = {}  # open connections per client address (`max_per_client`)
        self.conn_lock = threading.Lock()
        self.rejecter = Rejecter(limits.retry_after)
        super().__init__(addr, Handler)
        if tls is not None:
            # The handshake happens in the connection's own thread, under the header deadline: in
            # accept() a client that never finished it would stall every other client.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    def _client_key(self, client_address: Any) -> str | None:
        """The address a per-client cap counts against (None: exempt, a loopback client by default)."""
        host = str(client_address[0]) if isinstance(client_address, tuple) and client_address else ""
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        return None if loopback and not self.limits.cap_loopback else host

    def process_request(self, request: Any, client_address: Any) -> None:
        client = self._client_key(client_address)
        with self.conn_lock:
            full = (len(self.workers) >= self.limits.max_connections
                    or (client is not None and self.per_client.get(client, 0) >= self.limits.max_per_client))
            if not full:
                worker = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                          name="local-hub-connection", daemon=True)
                self.workers.add(worker)
                if client is not None:
                    self.per_client[client] = self.per_client.get(client, 0) + 1
        if full:
            self.rejecter.offer(request)
            return
        worker.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        client = self._client_key(client_address)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conn_lock:
                self.workers.discard(threading.current_thread())
                if client is not None:
                    left = self.per_client.pop(client, 1) - 1
                    if left > 0:
                        self.per_client[client] = left

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request (or faults that drop them) are routine here.
        log.debug("local hub: connection from %s ended with an error", client_address, exc_info=True)

    def close_all(self, timeout: float = 10.0) -> None:
        """End every open connection (pooled keep-alive ones included) and wait for their threads."""
        self.rejecter.stop()
        with self.conn_lock:
            conns, workers = list(self.connections), list(self.workers)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))


class Rejecter:
    """Answers connections over the cap with ``503`` and ``Retry-After``: one thread, any number of them.

    Each socket gets at most one second to send its request head (closing a socket with unread bytes
    sends a reset, and the client would see a dropped connection instead of the answer), then the
    answer, then half a second to read it. Past 256 waiting, or over TLS, a connection is just closed.
    """

    _MAX_PENDING = 256

    def __init__(self, retry_after: int):
        body = json.dumps({"error": "The local Hub is serving too many connections; retry shortly"}).encode()
        self._answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nRetry-After: {retry_after}\r\nConnection: close\r\n"
                        "X-Error-Message: The local Hub is serving too many connections; retry shortly\r\n\r\n"
                        ).encode() + body
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="local-hub-rejecter", daemon=True)
        self._thread.start()

    def offer(self, sock: socket.socket) -> None:
        if isinstance(sock, ssl.SSLSocket):
            sock.close()
        else:
            self._inbox.put(sock)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        pending: dict[socket.socket, list] = {}  # sock -> [deadline, head so far or None once answered]
        with selectors.DefaultSelector() as sel:
            while not self._stopped.is_set():
                while not self._inbox.empty():
                    sock = self._inbox.get()
                    if len(pending) >= self._MAX_PENDING:
                        sock.close()
                        continue
                    sock.setblocking(False)
                    pending[sock] = [time.monotonic() + 1.0, b""]
                    sel.register(sock, selectors.EVENT_READ)
                for key, _ in sel.select(timeout=0.05):
                    self._on_readable(key.fileobj, pending, sel)  # type: ignore[arg-type]
                now = time.monotonic()
                for sock, (deadline, head) in list(pending.items()):
                    if now >= deadline:
                        self._answer_or_close(sock, pending, sel, answered=head is None)
            for sock in list(pending):
                self._close(sock, pending, sel)

    def _on_readable(self, sock: socket.socket, pending: dict, sel: selectors.BaseSelector) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        state = pending[sock]
        if not data:
            self._close(sock, pending, sel)
        elif state[1] is not None:
            state[1] += data
            if b"\r\n\r\n" in state[1] or len(state[1]) > 65536:
                self._answer_or_close(sock, pending, sel, answered=False)

    def _answer_or_close(self, sock: socket.socket, pending: dict, sel: selectors.BaseSelector,
                         answered: bool) -> None:
        if answered:
            return self._close(sock, pending, sel)
        try:
            sock.send(self._answer)  # small: it fits the socket's send buffer
            sock.shutdown(socket.SHUT_WR)
            pending[sock] = [time.monotonic() + 0.5, None]
        except OSError:
            self._close(sock, pending, sel)

    @staticmethod
    def _close(sock: socket.socket, pending: dict, sel: selectors.BaseSelector) -> None:
        pending.pop(sock, None)
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-metagpt-local-hub/1"
    server: Server

    # Never log request lines or headers: they may carry tokens (and upload signatures in queries).
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def setup(self) -> None:
        limits = self.server.limits
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(limits.header_timeout)
            self.request.do_handshake()
        super().setup()
        # Reads go through a reader with deadlines; the plain file the base class made is closed
        # (it holds a reference that would keep the socket's descriptor open).
        self.rfile.close()
        self._reader = SocketReader(self.connection, limits)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def handle_one_request(self) -> None:
        self._reader.expect_request()
        super().handle_one_request()

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
        self._reader.expect_body()
        self._status: int | None = None
        self._rec: Any = None  # the RequestRecord the server keeps for this request
        self.drop_after: int | None = None
        self.body: Any = _REFUSED  # until its framing is checked
        self.raw_path, self.query = self.path.partition("?")[0], {}
        hub: Hooks = self.server.hub
        user: str | None = None
        try:
            self.raw_path, self.query = _split_target(self.path)
            self.body = BodyReader(self.rfile, self.headers)
            if self.server.hub_tokens:
                user = hub.access.authenticate(self.headers.get("Authorization"))
            hub.record(self, user, None)
            if hub.apply_fault(self):
                return
            self.server.router(hub.context, self, user)
        except HubError as err:
            self.send_error_json(err)
        except IncompleteBody:
            self.close_connection = True
            log.debug("local hub: %s %s: incomplete request body", self.command, self._shown_path())
        except TimeoutError:
            self.send_error_json(HubError(408, "Request body timed out"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except RecursionError:  # JSON nested past the parser's depth on a route that parsed it itself
            self.send_error_json(HubError(400, "Request is nested too deeply"))
        except Exception as exc:  # a bug in the server must not kill the connection silently
            log.exception("local hub: internal error on %s %s", self.command, self._shown_path())
            self.send_error_json(HubError(500, f"Internal error: {type(exc).__name__}"))
        finally:
            hub.record(self, user, self._status)
            if not self.body.done:
                self.close_connection = True  # unread body bytes would corrupt the next request

    def _shown_path(self) -> str:
        return printable(unquote(self.raw_path))

    def send_bytes(self, status: int, body: bytes = b"", headers: dict | None = None,
                   content_type: str = "application/json") -> None:
        self.send_head(status, len(body), headers, content_type)
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_head(self, status: int, length: int, headers: dict | None = None,
                  content_type: str = "application/json") -> None:
        self._status = status
        if self._rec is not None:  # before the client can read the answer: a test reads the log right after
            self._rec.status = status
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

    def send_header(self, keyword: str, value: Any) -> None:
        # Nothing a client sent may reach a header raw: CR/LF would split the response.
        super().send_header(printable(keyword, 100), printable(value, 16384))

    def send_error_json(self, err: HubError) -> None:
        headers = {"X-Error-Message": printable(err.message, 500), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        try:
            self.send_json({"error": err.message, **err.extra}, err.status, headers)
        except OSError:
            self.close_connection = True

    def json_body(self) -> Any:
        return parse_json(self.body.read_all(MAX_JSON_BODY) or b"{}", "Request body")

    def base_url(self) -> str:
        """The URL the client reached us at (its Host header, if well formed), for URLs in answers."""
        host = self.headers.get("Host") or ""
        if _HOST_RE.fullmatch(host):
            return f"{self.server.scheme}://{host}"
        return self.server.hub.endpoint


def _split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    try:
        split = urlsplit(target)
    except ValueError:  # e.g. an unbalanced '[' in an absolute URL
        raise HubError(400, "Invalid request target") from None
    return split.path, parse_qs(split.query, keep_blank_values=True)


class _Refused:
    """The body of a request whose framing was refused: the connection closes after the answer."""

    done = False
    declared_length = None


_REFUSED = _Refused()
