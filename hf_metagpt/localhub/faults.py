"""The local Hub's injected faults, rate limits and request log: what tests make go wrong, and see.

`LocalHub` takes these methods from `FaultsAndLog`; the request handler calls `record` and
`apply_fault` for every request (`transport.Handler`).
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .common import HubError

if TYPE_CHECKING:
    from .transport import Handler

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


class FaultsAndLog:
    """Injected faults, rate limits and the bounded request log of a `LocalHub`."""

    def _init_faults(self, request_log: int) -> None:
        self._faults: list[Fault] = []
        self._rate_limits: list[RateLimit] = []
        # Bounded: `hub serve` answers requests for days (the oldest records are dropped).
        self._requests: deque[RequestRecord] = deque(maxlen=request_log)
        self._meta_lock = threading.Lock()

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
