"""Calls to the Hub with retries and errors users can act on (what huggingface_hub does not retry itself)."""

from __future__ import annotations

import logging
import re
import threading
import time

from ..constants import RATE_LIMIT_WAIT_ENV, RETRY_BASE_ENV, seconds
from ..errors import DownloadStopped, HubAccessError, HubUnavailableError, MergeError

log = logging.getLogger(__name__)


#: attempts after the first one
RETRIES = 4

#: attempts after the first one for a Xet transfer (hf_xet has retried it already)
XET_RETRIES = 1


RETRY_BASE = 1.0


RETRY_MAX = 20.0


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def retry_base() -> float:
    """The first backoff delay (`constants.RETRY_BASE_ENV`, else `RETRY_BASE`)."""
    return seconds(RETRY_BASE_ENV, RETRY_BASE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub >= 2 talks through httpx2; older releases through httpx
        import httpx2 as httpx_mod  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover
        import httpx as httpx_mod  # type: ignore[no-redef]
    return (httpx_mod.TransportError,)


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: 5xx/408/429 from the Hub, a timeout or a lost connection.

    The client sometimes wraps the cause (`snapshot_download` turns a failed listing into
    LocalEntryNotFoundError), so the chain of causes is searched too.
    """
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    xet = xet_status(exc)
    if xet is not None:
        return xet == 0 or xet in _RETRY_STATUS
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            return status in _RETRY_STATUS
        if isinstance(e, transport):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def failed_request(exc: BaseException) -> str:
    """'HTTP 503 on GET .../resolve/<sha>/model-00001.safetensors' (no query string, no secrets)."""
    from urllib.parse import unquote, urlsplit

    if xet_status(exc) is not None:
        return _xet_summary(exc)
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            break
        response = getattr(e, "response", None)
        request = None
        try:
            request = getattr(e, "request", None) or getattr(response, "request", None)
        except RuntimeError:  # httpx raises when an error carries no request
            request = None
        if request is not None:
            path = unquote(urlsplit(str(request.url)).path)
            what = f"HTTP {response.status_code}" if response is not None else type(e).__name__
            return f"{what} on {request.method} {path}"
        e = e.__cause__ or e.__context__
    return type(exc).__name__


def api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="hf-metagpt")


#: huggingface_hub's error classes -> HubAccessError.reason (the first that matches)
_REASONS = (("GatedRepoError", "gated"), ("RepositoryNotFoundError", "not_found"),
            ("RevisionNotFoundError", "revision_not_found"), ("RemoteEntryNotFoundError", "entry_not_found"),
            ("LocalEntryNotFoundError", "unavailable"))


def hub_error(ref_text: str, exc: Exception) -> MergeError | None:
    """`_map_hub_error`, with the repo, the HTTP status and the kind of failure on the error
    (`HubAccessError.repo_id/status/reason`) and the huggingface_hub error as its `__cause__`."""
    mapped = _map_hub_error(ref_text, exc)
    if isinstance(mapped, HubAccessError):
        cause = _http_cause(exc) or exc
        status = getattr(getattr(cause, "response", None), "status_code", None)
        names = {c.__name__ for c in type(exc).__mro__} | {c.__name__ for c in type(cause).__mro__}
        reason = next((r for cls, r in _REASONS if cls in names), None)
        if reason in (None, "unavailable") and status in (401, 403):
            reason = "unauthorized" if status == 401 else "forbidden"
        if getattr(mapped, "status", None) is None:
            mapped.status = status
        if getattr(mapped, "repo_id", None) is None:
            mapped.repo_id = ref_text.split("@", 1)[0]
        if getattr(mapped, "reason", None) is None:
            mapped.reason = reason or ("http_error" if status else None)
        mapped.__cause__ = exc
    return mapped


def _map_hub_error(ref_text: str, exc: Exception) -> MergeError | None:
    """Map huggingface_hub's typed errors to one-line messages that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = xet_status(exc)
    if status is not None:
        return _xet_error(ref_text, exc, status)
    if isinstance(exc, GatedRepoError):
        from huggingface_hub import constants

        page = f"{constants.ENDPOINT.rstrip('/')}/{ref_text.split('@', 1)[0]}"
        return HubAccessError(f"{ref_text} is gated: its licence must be accepted, and the request carried no token "
                              f"of an account that did.",
                              hint=f"Accept the model's conditions on {page} (logged in), then pass a token of that "
                                   "account (--token, HF_TOKEN or `hf auth login`; token=... in Python).")
    if isinstance(exc, RepositoryNotFoundError):
        from .refs import local_folder_hint

        return HubAccessError(f"{ref_text}: repository not found or private.",
                              hint="Check the ID; for a private repo log in (`hf auth login`), set HF_TOKEN "
                                   "or pass a token with read access (--token / token=...)."
                                   + local_folder_hint(ref_text))
    if isinstance(exc, RevisionNotFoundError):
        return HubAccessError(f"{ref_text}: revision not found.",
                              hint="Use a branch, tag or commit SHA that exists in the repo (see its 'Files' tab).")
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        # hf_hub_download reports an HTTP error of its HEAD request as "not in the cache": the
        # HTTP answer (a 403 on a gated file, a 404) is the news, not the connection.
        cause = _http_cause(exc)
        if cause is not None and cause is not exc:
            mapped = hub_error(ref_text, cause)
            if mapped is not None:
                return mapped
        return HubAccessError(f"{ref_text}: the Hub could not be reached and the files are not in the cache.",
                              hint="Check the connection and HF_ENDPOINT (and that HF_HUB_OFFLINE is not set), "
                                   "then retry.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubAccessError(f"{ref_text}: a file the repo lists is missing on the Hub.",
                              hint="The repo may have changed; retry, or pin a revision with @SHA.")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return HubAccessError(f"{ref_text}: access denied (HTTP {status}).",
                                  hint="Pass a token with the needed permission (--token / token=..., HF_TOKEN "
                                       "or `hf auth login`).")
        return HubAccessError(f"{ref_text}: the Hub answered HTTP {status}.", hint="Retry later; the request was not completed.")
    return None


def _http_cause(exc: BaseException) -> BaseException | None:
    """The first huggingface_hub HTTP error in an exception's cause chain (None when it has none)."""
    from huggingface_hub.errors import HfHubHTTPError

    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, HfHubHTTPError):
            return e
        e = e.__cause__ or e.__context__
    return None


#: how hf_xet reports a failed request: `RuntimeError("Task error: File reconstruction error: CAS Client
#: Error: Request error: HTTP status client error (403 Forbidden), domain: http://.../v2/reconstructions/...")`
_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})[^)]*\)")
_XET_MARKERS = ("CAS Client Error", "Request error", "Network error", "File reconstruction error", "Xet")


def xet_status(exc: BaseException) -> int | None:
    """For an error of the Xet storage client (hf_xet): the HTTP status it met, 0 for a network error
    without one; None for any other exception."""
    for e in _chain(exc):
        module = type(e).__module__ or ""
        text = str(e)
        if module.startswith("hf_xet") or (isinstance(e, (RuntimeError, ConnectionError))
                                           and any(m in text for m in _XET_MARKERS)):
            m = _XET_STATUS.search(text)
            if m:
                return int(m.group(1))
            name = type(e).__name__
            if "Authentication" in name:
                return 401
            if "NotFound" in name:
                return 404
            return 0
    return None


def _chain(exc: BaseException):
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def _xet_summary(exc: BaseException) -> str:
    """'Xet storage: HTTP 403 on GET /v2/reconstructions/<hash>' (no host, no query, no token)."""
    text = str(next((e for e in _chain(exc) if xet_status(e) is not None), exc))
    status = xet_status(exc)
    path = re.search(r"domain: \S+?://[^/\s]+(/[^\s?,)]*)", text)
    where = f" on {path.group(1)}" if path else ""
    return f"Xet storage: HTTP {status}{where}" if status else f"Xet storage: network error{where}"


def _xet_error(ref_text: str, exc: BaseException, status: int) -> MergeError:
    what = _xet_summary(exc)
    if status in (401, 403):
        return HubAccessError(f"{ref_text}: the Hub's Xet storage refused the transfer ({what}).",
                              hint="Pass a token that may read (or, for a push, write) this repo (--token / "
                                   "token=..., HF_TOKEN or `hf auth login`); for a gated model, accept its "
                                   "conditions first. Xet can be bypassed with HF_HUB_DISABLE_XET=1.")
    if status == 404:
        return HubAccessError(f"{ref_text}: a file the repo lists is missing from the Hub's Xet storage ({what}).",
                              hint="The repo may have changed; retry, or pin a revision with @SHA.")
    return HubUnavailableError(f"{ref_text}: the Hub's Xet storage kept failing ({what}).",
                               hint="Retry later; files already downloaded stay in the Hub cache. "
                                    "HF_HUB_DISABLE_XET=1 downloads over plain HTTP instead.")


def stop_xet_transfers() -> None:
    """Cancel every Xet transfer of this process now (huggingface_hub's own Ctrl-C path).

    hf_xet runs a download on its own threads: raising from a progress callback does not stop
    it (the callback runs on hf_xet's poller thread). Aborting the session does; huggingface_hub
    starts a fresh one for the next transfer.
    """
    try:
        from huggingface_hub.utils._xet import abort_xet_session
    except ImportError:  # pragma: no cover - a huggingface_hub without Xet
        return
    try:
        abort_xet_session()
    except Exception as exc:  # noqa: BLE001 - best effort: the downloads then end on their own
        log.debug("could not abort the Xet session: %s", exc)


def call(ref_text: str, fn, *args, **kwargs):
    """Call huggingface_hub; retry transient failures with backoff; map errors to clear messages.

    Only for idempotent calls (reads, `create_repo(exist_ok=True)`, `create_branch(exist_ok=True)`).
    """
    return retrying(ref_text, lambda: fn(*args, **kwargs))


def call_until(stop: threading.Event | None, ref_text: str, fn, *args, **kwargs):
    """`call` whose waits end early, with `DownloadStopped`, once `stop` is set.

    A background download must not hold up the end of a failed merge for a 20 s backoff.
    """
    return retrying(ref_text, lambda: fn(*args, **kwargs), stop=stop)


def retrying(ref_text: str, attempt, *, stop: threading.Event | None = None, recover=None,
             doing: str = "", published: bool = False):
    """Run `attempt()` until it succeeds: the one retry loop of every Hub call (reads, downloads, push).

    Transient failures (5xx, 408, timeouts, lost connections) are retried `RETRIES` times with
    exponential backoff from `retry_base()`. A 429 that announces its reset (`RateLimit:
    "resolvers";r=0;t=N`, or `Retry-After`) waits that long instead, saying so, once for every
    thread that meets it (see `RateLimitGate`); a reset further away than `rate_limit_max_wait()`
    fails at once with the time to retry. `stop` ends any wait with `DownloadStopped`. Before a
    retry, `recover(exc)` may return the result after all (a push whose answer was lost but whose
    commit landed). Other failures become `HubAccessError`s with a hint (`hub_error`).
    """
    limit = RETRIES
    delay = retry_base()
    failures = 0
    while True:
        RATE_LIMIT.wait(stop, ref_text)
        try:
            return attempt()
        except MergeError:
            raise
        except Exception as exc:
            if not transient(exc):
                mapped = hub_error(ref_text, exc)
                if mapped is None:
                    raise
                raise mapped from exc  # the Hub's error stays the cause (--debug shows both)
            if recover is not None:
                got = recover(exc)
                if got is not None:
                    return got
            reset = rate_limit_reset(exc)
            if reset is not None:
                if reset > rate_limit_max_wait():
                    raise _rate_limited(ref_text, exc, reset, published) from None
                if RATE_LIMIT.close_for(reset, ref_text, failed_request(exc)):
                    failures += 1  # bounded: a limit that never resets ends like any other failure
                if failures > limit:
                    raise gave_up(ref_text, exc, published=published, attempts=failures) from None
                continue
            failures += 1
            # hf_xet retries a failed transfer itself for about a minute: one more try of ours is enough
            most = min(limit, XET_RETRIES) if xet_status(exc) is not None else limit
            if failures > most:
                raise gave_up(ref_text, exc, published=published, attempts=failures) from None
            log.warning("warning: %s: %s%s; retrying in %.1f s (%d/%d)", ref_text, doing, failed_request(exc),
                        delay, failures, most)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise DownloadStopped(f"{ref_text}: download stopped (the merge ended).") from None
            delay = min(RETRY_MAX, delay * 2)


#: the Hub's rate-limit windows last 5 minutes: a reset is never further away than that, plus a margin
RATE_LIMIT_MAX_WAIT = 330.0


def rate_limit_max_wait() -> float:
    """The longest rate-limit reset worth waiting for (`constants.RATE_LIMIT_WAIT_ENV`)."""
    return seconds(RATE_LIMIT_WAIT_ENV, RATE_LIMIT_MAX_WAIT)


def rate_limit_reset(exc: BaseException) -> float | None:
    """Seconds until the Hub's rate limit resets, for a 429 that says (`RateLimit` t=, else `Retry-After`); else None."""
    cause = _http_cause(exc)
    response = getattr(cause, "response", None)
    if response is None or getattr(response, "status_code", None) != 429:
        return None
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(response.headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    retry_after = response.headers.get("Retry-After")
    try:
        return float(retry_after) if retry_after is not None else None
    except ValueError:
        return None


class RateLimitGate:
    """When the Hub's rate limit reopens: every call waits for it before its next request.

    A 429 closes the gate until the reset it announces (plus one second, as huggingface_hub
    does); the threads that meet the same limit wait for the same moment, and the message is
    logged once per closing, not once per thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def close_for(self, reset: float, ref_text: str, request: str) -> bool:
        """Close the gate `reset` s from now; True when this extended it (a new closing, logged)."""
        now = time.monotonic()
        until = now + reset + 1.0
        with self._lock:
            if self._until > now and until <= self._until + 1.0:
                return False  # the same closing, met by another thread
            self._until = until
        log.warning("warning: %s: rate-limited by the Hub (%s); waiting %.0f s for the announced reset "
                    "(RateLimit t=%.0f), then continuing", ref_text, request, reset + 1.0, reset)
        return True

    def wait(self, stop: threading.Event | None, ref_text: str) -> None:
        with self._lock:
            left = self._until - time.monotonic()
        if left <= 0:
            return
        if stop is None:
            time.sleep(left)
        elif stop.wait(left):
            raise DownloadStopped(f"{ref_text}: download stopped (the merge ended).") from None


RATE_LIMIT = RateLimitGate()


def _rate_limited(ref_text: str, exc: BaseException, reset: float, published: bool) -> HubUnavailableError:
    hint = (f"Retry in {reset / 60:.0f} min" if reset >= 120 else f"Retry in {reset:.0f} s")
    hint += ("; nothing was published" if not published else "")
    hint += (f". Waits up to {rate_limit_max_wait():.0f} s are taken automatically ({RATE_LIMIT_WAIT_ENV}); "
             "logging in (HF_TOKEN or `hf auth login`) gives higher limits.")
    return HubUnavailableError(f"{ref_text}: rate-limited by the Hub ({failed_request(exc)}); its limit resets "
                               f"in {reset:.0f} s.", hint=hint)


def gave_up(ref_text: str, exc: BaseException, *, published: bool = False,
            attempts: int = RETRIES + 1) -> HubUnavailableError:
    hint = "The Hub or the network is having trouble. Retry the same command later"
    hint += ("; nothing was published (a push is one commit)" if not published else "")
    hint += "; files already downloaded stay in the Hub cache and are not fetched again."
    if "GET" in failed_request(exc) and "/" in ref_text:
        from .refs import local_folder_hint

        # `org/name` is also how a relative folder is written: a mistyped path lands here.
        hint += local_folder_hint(ref_text) or (f" If {ref_text.split('@')[0]!r} was meant as a local "
                                                "folder: no such folder exists here.")
    return HubUnavailableError(f"{ref_text}: the Hub kept failing after {attempts} attempts "
                               f"({failed_request(exc)}).", hint=hint)


def tok(token: str | None) -> str | None:
    return token  # None: huggingface_hub's own sources (HF_TOKEN, the stored login)
