"""Calls to the Hub with retries and errors users can act on (what huggingface_hub does not retry itself)."""

from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import MergeError

log = logging.getLogger(__name__)


class HubAccessError(MergeError):
    """A Hub repo or revision cannot be read (missing, private, gated) or written."""


class HubUnavailableError(HubAccessError):
    """The Hub kept failing (5xx, timeouts, dropped connections) after every retry."""


#: attempts after the first one
RETRIES = 4


#: environment variable: the first backoff delay in seconds (doubled after each failure)
RETRY_BASE_ENV = "HF_METAGPT_RETRY_BASE"


RETRY_BASE = 1.0


RETRY_MAX = 20.0


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def _retry_base() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_BASE_ENV) or RETRY_BASE))
    except ValueError:
        return RETRY_BASE


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub >= 2 talks through httpx2; older releases through httpx
        import httpx2 as httpx_mod  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover
        import httpx as httpx_mod  # type: ignore[no-redef]
    return (httpx_mod.TransportError,)


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying: 5xx/408/429 from the Hub, a timeout or a lost connection.

    The client sometimes wraps the cause (`snapshot_download` turns a failed listing into
    LocalEntryNotFoundError), so the chain of causes is searched too.
    """
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
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


def _failed_request(exc: BaseException) -> str:
    """'HTTP 503 on GET .../resolve/<sha>/model-00001.safetensors' (no query string, no secrets)."""
    from urllib.parse import unquote, urlsplit

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


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="hf-metagpt")


def _hub_errors(ref_text: str, exc: Exception) -> MergeError | None:
    """Map huggingface_hub's typed errors to one-line messages that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
            mapped = _hub_errors(ref_text, cause)
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


def _call(ref_text: str, fn, *args, **kwargs):
    """Call huggingface_hub; retry transient failures with backoff; map errors to clear messages.

    Only for idempotent calls (reads, `create_repo(exist_ok=True)`, `create_branch(exist_ok=True)`).
    """
    return _call_until(None, ref_text, fn, *args, **kwargs)


class DownloadStopped(MergeError):
    """A background download was abandoned because its provider was closed (the merge ended)."""


def _call_until(stop: threading.Event | None, ref_text: str, fn, *args, **kwargs):
    """`_call` whose backoff waits end early, with `DownloadStopped`, once `stop` is set.

    A background download must not hold up the end of a failed merge for a 20 s backoff.
    """
    delay = _retry_base()
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except MergeError:
            raise
        except Exception as exc:
            if _transient(exc):
                if attempt < RETRIES:
                    log.warning("warning: %s: %s; retrying in %.1f s (%d/%d)", ref_text, _failed_request(exc),
                                delay, attempt + 1, RETRIES)
                    if stop is None:
                        time.sleep(delay)
                    elif stop.wait(delay):
                        raise DownloadStopped(f"{ref_text}: download stopped (the merge ended).") from None
                    delay = min(RETRY_MAX, delay * 2)
                    continue
                raise _gave_up(ref_text, exc) from None
            mapped = _hub_errors(ref_text, exc)
            if mapped is None:
                raise
            raise mapped from None
    raise AssertionError("unreachable")  # pragma: no cover


def _gave_up(ref_text: str, exc: BaseException, *, published: bool = False) -> HubUnavailableError:
    hint = "The Hub or the network is having trouble. Retry the same command later"
    hint += ("; nothing was published (a push is one commit)" if not published else "")
    hint += "; files already downloaded stay in the Hub cache and are not fetched again."
    if "GET" in _failed_request(exc) and "/" in ref_text:
        from .refs import local_folder_hint

        # `org/name` is also how a relative folder is written: a mistyped path lands here.
        hint += local_folder_hint(ref_text) or (f" If {ref_text.split('@')[0]!r} was meant as a local "
                                                "folder: no such folder exists here.")
    return HubUnavailableError(f"{ref_text}: the Hub kept failing after {RETRIES + 1} attempts "
                               f"({_failed_request(exc)}).", hint=hint)


def _tok(token: str | None) -> str | None:
    return token  # None: huggingface_hub's own sources (HF_TOKEN, the stored login)
