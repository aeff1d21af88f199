"""The local Hub server object: start/stop, users, how files are served.

Its repo settings (`admin.RepoAdmin`) and injected faults and request log (`faults.FaultsAndLog`)
are its other two jobs, each in a module of its own.

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
import os
import secrets
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from . import cas
from .access import Access, Context, Features
from .admin import RepoAdmin
from .common import Limits
from .faults import FaultsAndLog
from .storage import Store
from .transport import Server

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (where plain HTTP cannot leak a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalHub(RepoAdmin, FaultsAndLog):
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
        self._init_faults(self.limits.request_log)
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

    def set_storage(self, *, cdn: bool | None = None, xet: bool | None = None,
                    resolve_cache: bool | None = None) -> None:
        """Switch how LFS files are served from now on: `cdn` redirects them to signed URLs of the
        storage side (which refuses an Authorization header); `xet` makes them Xet-backed like new
        uploads on the Hub (X-Xet-Hash, xet-auth link, CAS reconstruction), and uploads then go
        through Xet too (the xet-write-token endpoint answers). `resolve_cache`: regular files answer a
        307 to a relative ``/api/resolve-cache/...`` URL pinned to the commit, as huggingface.co does."""
        if resolve_cache is not None:
            self.features.resolve_cache = resolve_cache
        if cdn is not None:
            self.features.cdn = cdn
        if xet is not None:
            self.features.xet = xet
