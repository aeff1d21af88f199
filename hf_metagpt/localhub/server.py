"""The local Hub server object: start/stop, users, injected faults and the request log.

Example:
    ```py
    >>> from hf_metagpt.localhub import LocalHub
    >>> with LocalHub("./hub-data", tokens={"hf_local": "me"}) as hub:
    ...     print(hub.endpoint)   # e.g. http://127.0.0.1:54321
    ```
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote

from . import cas
from .access import Access, Context, Features
from .common import NAME_RE, REPO_TYPES, HubError, Limits, repo_id_of
from .storage import Repo, Store
from .transport import Handler, Server

log = logging.getLogger(__name__)

#: paths whose query string is a signature (LFS upload, CDN and Xet transfer URLs): never kept in the log
SIGNED_PREFIXES = ("/_lfs/", "/cdn/", "/xorbs/")


@dataclass
class Fault:
    """An injected failure: matching requests get `status` (or a dropped connection) `times` times.

    `times=None` means forever. `delay` seconds are slept first; with `status=None` and no `drop`,
    the request is then served normally (a pure slowdown). With `drop_after=N` a file is served
    normally but its connection is closed after N body bytes (a connection lost mid-download).
    `hits` counts the requests it hit.
    """

    pattern: re.Pattern
    status: int | None = 500
    times: int | None = 1
    method: str | None = None
    delay: float = 0.0
    drop: bool = False
    hits: int = 0
    drop_after: int | None = None
    #: serve the request (a commit lands) but lose its answer: the connection closes unanswered
    lose_answer: bool = False

    def _matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.pattern.search(path) is not None


@dataclass
class RateLimit:
    """A Hub-like fixed-window rate limit: at most `limit` matching requests per `window` seconds.

    Past the limit, requests answer 429 with the Hub's headers, ``RateLimit: "<resource>";r=0;t=<s>``
    (seconds until the window resets) and ``RateLimit-Policy: "fixed window";"<resource>";q=<limit>;w=<window>``,
    until the window ends. `limited` counts the 429s it answered.
    """

    pattern: re.Pattern
    limit: int
    window: float
    resource: str = "resolvers"
    started: float = 0.0
    used: int = 0
    limited: int = 0

    def check(self, path: str, now: float) -> dict[str, str] | None:
        """None when a request for `path` may pass (counted); else the 429's headers."""
        if self.pattern.search(path) is None:
            return None
        if now >= self.started + self.window:
            self.started, self.used = now, 0
        policy = f'"fixed window";"{self.resource}";q={self.limit};w={self.window:g}'
        if self.used < self.limit:
            self.used += 1
            return None
        self.limited += 1
        reset = max(1, math.ceil(self.started + self.window - now))
        return {"RateLimit": f'"{self.resource}";r=0;t={reset}', "RateLimit-Policy": policy}


@dataclass
class RequestRecord:
    """One request as seen by the server (never headers with credentials)."""

    method: str
    path: str  # URL path, unquoted, without query string
    query: str
    range: str | None
    authenticated_as: str | None
    status: int | None = None
    #: an Authorization header came with the request (a signed CDN URL must never get one)
    authorization: bool = False


class _Discard:
    """A write end that drops everything: the answer of a request whose answer is 'lost'."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (where plain HTTP cannot leak a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalHub:
    """A local Hub-compatible server: repos, commits, LFS and access control, in a data folder.

    Args:
        data_dir: folder holding blobs and repo logs; reusing it after a restart keeps every repo.
        host: interface to bind (default loopback only).
        port: TCP port; 0 picks a free one.
        tokens: ``{token: user name}`` accepted as ``Authorization: Bearer <token>``.
        orgs: ``{org name: [member user names]}``; members may write in the org's namespace.
        limits: timeouts, connection cap, listen backlog and tree page size (`Limits`).
        tls: ``(certificate file, key file)`` to serve HTTPS; plain HTTP without it, where tokens
            travel in clear, which only loopback makes safe.

    Example:
        ```py
        >>> hub = LocalHub(tmp_path, tokens={"hf_x": "alice"})
        >>> endpoint = hub.start()
        >>> hub.inject_fault(r"/resolve/", status=503, times=1)   # next download answers 503 once
        >>> hub.stop()
        ```
    """

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 tokens: dict[str, str] | None = None, orgs: dict[str, Iterable[str]] | None = None,
                 limits: Limits | None = None, tls: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                 cdn: bool = False, xet: bool = False):
        self.data_dir = Path(data_dir)
        self.features = Features(cdn=cdn, xet=xet)
        self._storage: Server | None = None
        self._storage_thread: threading.Thread | None = None
        self.limits = limits or Limits()
        self.tls = tls
        self.host, self.port = host, port
        self.access = Access(tokens, orgs)
        self._context: Context | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[Fault] = []
        self._rate_limits: list[RateLimit] = []
        # Bounded: `hub serve` answers requests for days (the oldest records are dropped).
        self._requests: deque[RequestRecord] = deque(maxlen=self.limits.request_log)
        self._meta_lock = threading.Lock()
        # Signs LFS upload URLs: the client PUTs to them without credentials, like to a bucket.
        self._secret = secrets.token_bytes(32)

    # ---- lifecycle
    @property
    def tokens(self) -> dict[str, str]:
        """``{token: user}`` accepted now (add more with `add_token`)."""
        return self.access.tokens

    @property
    def orgs(self) -> dict[str, set[str]]:
        return self.access.orgs

    @property
    def context(self) -> Context:
        """The store, access rules and signing key the endpoints work with (once started)."""
        if self._context is None:
            raise RuntimeError("LocalHub is not started")
        return self._context

    @property
    def endpoint(self) -> str:
        """Base URL to use as HF_ENDPOINT, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"{self._server.scheme}://{host}:{self._server.server_address[1]}"

    @property
    def open_connections(self) -> int:
        """Connections being served now (each holds one thread, never more)."""
        if self._server is None:
            return 0
        with self._server.conn_lock:
            return len(self._server.workers)

    def start(self) -> str:
        """Load the data folder, serve in a background thread, and return the endpoint URL."""
        if self._server is not None:
            return self.endpoint
        self._context = Context(Store(self.data_dir), self.access, self._secret, self.limits, self.features)
        tls = None
        if self.tls is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(*self.tls)
        self._server = Server((self.host, self.port), self, self.limits, tls)
        # The storage side (CDN and Xet CAS) on a port of its own: another origin, like the Hub's.
        self._storage = Server((self.host, 0), self, self.limits, tls, router=cas.route, hub_tokens=False)
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self.features.storage_url = f"{self._storage.scheme}://{host}:{self._storage.server_address[1]}"
        self._storage_thread = threading.Thread(target=self._storage.serve_forever, name="local-hub-storage",
                                                daemon=True)
        self._storage_thread.start()
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        log.info("local hub serving %s from %s", self.endpoint, self.data_dir)
        return self.endpoint

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (used by ``hf-metagpt hub serve``)."""
        self.start()
        try:
            assert self._thread is not None
            # Sleep rather than join(timeout): a KeyboardInterrupt landing inside Thread.join can
            # leave the thread's state lock held on CPython < 3.13, and the join in stop() then
            # hangs forever (seen as an intermittent hang of `hub serve` on Ctrl-C).
            while self._thread.is_alive():
                time.sleep(0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and close every open connection (pooled keep-alive ones included)."""
        storage, self._storage = self._storage, None
        if storage is not None:
            storage.shutdown()
            storage.server_close()
            storage.close_all()
            if self._storage_thread is not None:
                self._storage_thread.join()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "LocalHub":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- users
    def add_token(self, token: str, user: str) -> None:
        """Accept `token` as user `user` from now on."""
        self.access.add_token(token, user)

    def add_org(self, org: str, members: Iterable[str]) -> None:
        """Create (or extend) an organization whose members may write in its namespace."""
        self.access.add_org(org, members)

    # ---- how files are served
    @property
    def storage_url(self) -> str:
        """Base URL of the storage side (CDN and Xet CAS): another origin than `endpoint`."""
        return self.features.storage_url

    def set_storage(self, *, cdn: bool | None = None, xet: bool | None = None) -> None:
        """Switch how LFS files are served from now on: `cdn` redirects them to signed URLs of the
        storage side (which refuses an Authorization header); `xet` makes them Xet-backed like new
        uploads on the Hub (X-Xet-Hash, xet-auth link, CAS reconstruction), and uploads then go
        through Xet too (the xet-write-token endpoint answers)."""
        if cdn is not None:
            self.features.cdn = cdn
        if xet is not None:
            self.features.xet = xet

    # ---- renamed repos and canonical IDs
    def rename_repo(self, repo_id: str, new_id: str, *, repo_type: str = "model") -> None:
        """Rename a repo like the Hub's settings page: its old URLs answer a 307 to the new ones."""
        ns, _, name = new_id.partition("/")
        try:
            new_id = repo_id_of(ns, name)
        except HubError as err:
            raise ValueError(err.message) from None
        self.context.store.rename(self._repo(repo_id, repo_type), new_id)

    def add_canonical(self, name: str, repo_id: str, *, repo_type: str = "model") -> None:
        """Serve `repo_id` under a canonical name without namespace too (`gpt2` -> `openai-community/gpt2`),
        through a 307 as the Hub does."""
        if not NAME_RE.match(name):
            raise ValueError(f"Invalid canonical name {name!r}")
        self._repo(repo_id, repo_type)
        self.context.store.add_alias(repo_type, name, repo_id)

    # ---- gated repos
    def set_gated(self, repo_id: str, mode: str | bool = "manual", *, repo_type: str = "model") -> None:
        """Gate a repo like a licence-gated model on the Hub (`mode` "auto" or "manual"), or ungate it (False).

        Its info, tree and refs stay visible to all; its files only to the owner (namespace or org
        members) and users given `grant_access`. Both modes need a grant here: nobody accepts
        conditions on a page of the local Hub. Kept across restarts.
        """
        if mode is not False and mode not in ("auto", "manual"):
            raise ValueError(f"Gated mode must be 'auto', 'manual' or False, not {mode!r}")
        self.context.store.set_gated(self._repo(repo_id, repo_type), mode)

    def grant_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Let `user` download the files of a gated repo (as if its licence were accepted and approved)."""
        self.context.store.set_access(self._repo(repo_id, repo_type), self._user(user), True)

    def revoke_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Undo `grant_access` (the owner keeps access)."""
        self.context.store.set_access(self._repo(repo_id, repo_type), self._user(user), False)

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        if repo_type not in REPO_TYPES.values():
            raise ValueError(f"Unknown repo type {repo_type!r}: use one of {', '.join(REPO_TYPES.values())}")
        ns, _, name = repo_id.partition("/")
        try:
            repo_id = repo_id_of(ns, name)
        except HubError as err:
            raise ValueError(err.message) from None
        repo = self.context.store.repos.get((repo_type, repo_id))
        if repo is None:
            raise ValueError(f"No {repo_type} repo {repo_id} on this local Hub: create it first")
        return repo

    @staticmethod
    def _user(user: str) -> str:
        if not NAME_RE.match(user):
            raise ValueError(f"Invalid user name {user!r}")
        return user

    # ---- fault injection and request log
    def inject_fault(self, path_regex: str, *, status: int | None = 500, times: int | None = 1,
                     method: str | None = None, delay: float = 0.0, drop: bool = False,
                     drop_after: int | None = None, lose_answer: bool = False) -> Fault:
        """Make requests whose unquoted URL path matches `path_regex` fail.

        Answers `status` with a JSON error (or closes the connection without an answer if `drop`),
        after sleeping `delay` seconds, for the next `times` matching requests (None: forever).
        `drop_after=N`: serve the file but cut the connection after N body bytes (status ignored).
        `lose_answer=True`: serve the request normally (its effects happen) but never send the answer.
        Returns the `Fault`; its `hits` counts the requests it caught.
        """
        fault = Fault(re.compile(path_regex), None if drop_after is not None or lose_answer else status, times,
                      method, delay, drop, drop_after=drop_after, lose_answer=lose_answer)
        with self._meta_lock:
            self._faults.append(fault)
        return fault

    def rate_limit(self, path_regex: str, *, limit: int, window: float = 300.0,
                   resource: str = "resolvers") -> RateLimit:
        """Rate-limit requests whose unquoted path matches, like the Hub: `limit` per fixed `window` s.

        Over the limit they answer 429 with ``RateLimit``/``RateLimit-Policy`` headers saying when
        the window resets (the Hub's windows last 300 s; tests use a second or two). Removed by
        `clear_faults`. Returns the `RateLimit` (its `limited` counts the 429s).
        """
        rl = RateLimit(re.compile(path_regex), limit, window, resource, started=time.monotonic())
        with self._meta_lock:
            self._rate_limits.append(rl)
        return rl

    def clear_faults(self) -> None:
        """Remove every injected fault and rate limit."""
        with self._meta_lock:
            self._faults.clear()
            self._rate_limits.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests served so far (method, unquoted path, query, Range header, user, status)."""
        with self._meta_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._meta_lock:
            self._requests.clear()

    def record(self, h: "Handler", user: str | None, status: int | None) -> None:
        # Recorded before the answer (so a caller sees it as soon as its call returns), then the
        # status is filled in. Upload URLs carry a signature in their query: never keep it.
        if h._rec is not None:
            h._rec.status, h._rec.authenticated_as = status, user
            return
        query = "" if h.raw_path.startswith(SIGNED_PREFIXES) else h.path.partition("?")[2]
        h._rec = RequestRecord(h.command, unquote(h.raw_path), query, h.headers.get("Range"), user, status,
                               authorization=h.headers.get("Authorization") is not None)
        with self._meta_lock:
            self._requests.append(h._rec)

    def apply_fault(self, h: "Handler") -> bool:
        path = unquote(h.raw_path)
        limited: dict[str, str] | None = None
        with self._meta_lock:
            fault = next((f for f in self._faults if f._matches(h.command, path)), None)
            if fault is not None:
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
            else:
                now = time.monotonic()
                limited = next((hd for rl in self._rate_limits if (hd := rl.check(path, now)) is not None), None)
        if fault is None:
            if limited is None:
                return False
            reset = limited["RateLimit"].rsplit("=", 1)[1]
            h.send_error_json(HubError(429, f"You have been rate-limited; you can retry this action in about "
                                            f"{reset} seconds.", headers=limited))
            return True
        if fault.delay:
            time.sleep(fault.delay)
        h.drop_after = fault.drop_after
        if fault.lose_answer:
            h.wfile = _Discard()  # type: ignore[assignment]
            h.close_connection = True
            return False
        if fault.drop:
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if fault.status is None:
            return False
        h.send_error_json(HubError(fault.status, f"Injected fault ({fault.status})"))
        return True
