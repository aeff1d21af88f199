"""Shared leaf of the local Hub: constants, the Hub's naming rules, HubError and small pure helpers.

Deliberately stdlib-only, like the whole package: tests start the server before huggingface_hub is
first imported.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

# Same threshold as the Hub: larger files must go through LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
CHUNK = 1024 * 1024
# One NDJSON line carries at most one regular (<= 10 MB, base64) file; anything far larger is abuse.
MAX_NDJSON_LINE = 32 * 1024 * 1024
MAX_JSON_BODY = 8 * 1024 * 1024

# Bodies, lines and lists a client may send; the Hub's own client stays far below each
# (it batches LFS objects and preupload files by 256 and sends one NDJSON line per file).
MAX_COMMIT_BODY = 1024 * 1024 * 1024
MAX_COMMIT_OPS = 100_000
MAX_LIST_ITEMS = 1000  # objects in an LFS batch, files in a preupload
MAX_PATHS_INFO = 10_000
MAX_PATH_LEN = 1024
MAX_REVISION_LEN = 255
MAX_MESSAGE_LEN = 64 * 1024

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tflite *.tgz *.wasm "
    "*.xz *.zip *.zst *tfevents* *.gguf"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error": ...}`` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, *, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class Limits:
    """How long and how many: the server's bounds against slow, stuck or too many clients.

    Args:
        header_timeout: seconds from a request's first byte to the end of its headers (slowloris).
        idle_timeout: seconds a kept-alive connection may wait for its next request (the Hub's client
            drops idle pooled connections after 5 s, so it never meets this one).
        body_timeout: seconds any single read of a body (or write of an answer) may stall.
        max_connections: connections served at once; more get 503 with ``Retry-After``.
        backlog: the listen queue; the default of 5 made bursts of clients wait 1/3/7/15 s for SYN retries.
        tree_page: entries per page of a tree listing (the rest follows a ``Link: rel="next"``).
        min_body_rate: bytes per second a request body must average once `body_grace` seconds have
            passed (a client dripping a byte at a time would otherwise hold a connection for ever).
        body_grace: seconds a body may take before `min_body_rate` applies.
        max_per_client: connections one client address may hold at once (the rest get 503). Loopback
            clients share one address (every local tool and test), so they are exempt unless
            `cap_loopback`.
        request_log: requests kept in `LocalHub.requests` (the oldest are dropped beyond it).
    """

    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    body_timeout: float = 60.0
    max_connections: int = 256
    backlog: int = 1024
    retry_after: int = 1
    tree_page: int = 1000
    min_body_rate: float = 64 * 1024
    body_grace: float = 10.0
    max_per_client: int = 64
    cap_loopback: bool = False
    request_log: int = 10_000


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub uses as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def printable(text: Any, limit: int = 200) -> str:
    """`text` made safe for a header or a log line: one line of printable ASCII, other characters escaped."""
    out = _PRINTABLE_RE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def clean_path(path: Any, *, allow_empty: bool = False) -> str:
    """Validate a path inside a repo; refuse anything that could leave the repo (or the data folder)."""
    if not isinstance(path, str):
        raise HubError(400, "Invalid path: expected a string")
    if path == "" and allow_empty:
        return ""
    parts = path.split("/")
    if (
        path.startswith("/")
        or "\\" in path
        or _CONTROL_RE.search(path)
        or len(path) > MAX_PATH_LEN
        or any(p in ("", ".", "..", ".git") for p in parts)
        or re.match(r"^[A-Za-z]:", path)
    ):
        raise HubError(400, f"Invalid path in repo: {printable(repr(path))}")
    return path


def check_revision(rev: Any) -> str:
    """A branch, tag, ``refs/...`` name or commit id with the characters the Hub allows; else 400."""
    if not isinstance(rev, str) or not rev or len(rev) > MAX_REVISION_LEN or not BRANCH_RE.match(rev) \
            or ".." in rev:
        raise HubError(400, f"Invalid revision {printable(repr(rev))}: use a branch, tag, refs/pr/N or commit id "
                            "(letters, digits, '.', '_', '-' and '/')")
    return rev


def repo_id_of(ns: str, name: str) -> str:
    """``ns/name`` if both parts follow the Hub's repo name rules; else 400 (before the id is used)."""
    if not (NAME_RE.match(ns) and NAME_RE.match(name)) or name.endswith(".git") or any(
            bad in part for part in (ns, name) for bad in ("--", "..")):
        raise HubError(400, f"Invalid repo id {printable(repr(ns + '/' + name))}: use letters, digits, '-', '_' "
                            "and '.' (no '--' or '..'), at most 96 characters per part")
    return f"{ns}/{name}"


def parse_token_spec(spec: str) -> tuple[str, str]:
    """`TOKEN` or `USER:TOKEN` -> (token, user); a bare token belongs to user ``user``."""
    user, sep, token = spec.partition(":")
    if not sep:
        return spec, "user"
    if not NAME_RE.match(user) or not token:
        raise ValueError(f"Bad token spec {spec!r}: expected TOKEN or USER:TOKEN")
    return token, user
