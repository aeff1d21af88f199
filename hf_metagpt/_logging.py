"""What the CLI prints on stderr, and what no log line may carry.

Levels: hf-metagpt's own messages at INFO (notes, warnings); every library (httpx, huggingface_hub,
matplotlib, ...) at WARNING. `-q`: our warnings only. `-v`: the libraries' INFO too (each HTTP
request). `--debug`: everything. At every level, a URL whose query string carries a signature, an
expiry or a token (a CDN download, a presigned LFS or Xet upload) is logged without its query, and
a bearer token or `hf_...` token is masked.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl

#: query keys that make a URL a credential (S3/CloudFront/Xet signatures, expiries, tokens, the local Hub's sig)
_SECRET_KEYS = re.compile(
    r"^(x-amz-.*|x-goog-.*|x-xet-.*|signature|sig|expires|policy|key-pair-id|token|access_token|"
    r"auth|authorization|credential|se|sp|sv|sr|skoid|sktid|hmac.*|.*signature.*|.*token.*)$",
    re.IGNORECASE)
_URL = re.compile(r"""(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s"'<>?#]+)\?(?P<query>[^\s"'<>#]*)""")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")

#: the loggers whose records name URLs: each gets the redacting filter itself, so a handler that
#: is not ours (an application's, huggingface_hub's own) never sees a signature either
_URL_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "huggingface_hub", "urllib3", "hf_xet")


def _query_is_secret(query: str) -> bool:
    try:
        pairs = parse_qsl(query, keep_blank_values=True)
    except ValueError:
        return True
    return any(_SECRET_KEYS.match(k) for k, _ in pairs)


def redact(text: str) -> str:
    """`text` with the query of every signed URL replaced by `<redacted>` and tokens masked."""
    def url(m: re.Match) -> str:
        return f"{m['head']}?<redacted>" if _query_is_secret(m["query"]) else m.group(0)

    text = _URL.sub(url, text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _HF_TOKEN.sub("hf_<redacted>", text)


class RedactFilter(logging.Filter):
    """Rewrites a record whose message holds a signed URL or a token (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactFilter()
F = TypeVar("F", bound=Callable[..., Any])


def protect_loggers() -> None:
    """Put the redacting filter on the loggers that log URLs (idempotent; changes no level)."""
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def configure_cli(*, quiet: bool = False, verbose: bool = False, debug: bool = False) -> None:
    """The CLI's logging: one stderr handler (redacting); libraries at WARNING unless -v/--debug.

    Where logging is configured already (the root logger has a handler that is not ours: an
    application calling `cli.main`, a test runner), levels and handlers are left alone, as
    `logging.basicConfig` would; only the redacting filter is added.
    """
    protect_loggers()
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not getattr(h, "hf_metagpt", False)]
    if foreign:
        for h in foreign:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.hf_metagpt = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s" if debug else "%(message)s"))
    handler.addFilter(_FILTER)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    ours = logging.getLogger("hf_metagpt")
    ours.setLevel(logging.DEBUG if debug else logging.WARNING if quiet and not verbose else logging.INFO)
    # huggingface_hub prints through a handler of its own as well as the root's (each warning twice):
    # here everything goes through the one handler above, at the root's level unless
    # HF_HUB_VERBOSITY asks for another.
    import os

    import huggingface_hub.utils.logging  # noqa: F401  (its import adds that handler: remove it after)

    hub = logging.getLogger("huggingface_hub")
    for old in list(hub.handlers):
        hub.removeHandler(old)
    if not os.environ.get("HF_HUB_VERBOSITY") or debug:
        hub.setLevel(logging.NOTSET)


def honour_progress(fn: F) -> F:
    """`fn(..., progress=False)` shows no progress bar at all: huggingface_hub's (downloads, uploads)
    are off while it runs, as well as ours."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with bars_off(kwargs.get("progress", True) is False):
            return fn(*args, **kwargs)

    return typing.cast(F, wrapper)


@contextmanager
def bars_off(off: bool) -> Iterator[None]:
    """huggingface_hub's progress bars (downloads, uploads, header parsing) off while inside, when `off`."""
    if not off:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
