"""Shared leaf of the local Hub: constants, the Hub's naming rules, HubError and small pure helpers.

Deliberately stdlib-only, like the whole package: tests start the server before huggingface_hub is
first imported.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

# Same threshold as the Hub: larger files must go through LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
CHUNK = 1024 * 1024
# One NDJSON line carries at most one regular (<= 10 MB, base64) file; anything far larger is abuse.
MAX_NDJSON_LINE = 32 * 1024 * 1024
MAX_JSON_BODY = 8 * 1024 * 1024

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


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub uses as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


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
        or "\x00" in path
        or any(p in ("", ".", "..", ".git") for p in parts)
        or re.match(r"^[A-Za-z]:", path)
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def repo_id_of(ns: str, name: str) -> str:
    if not (NAME_RE.match(ns) and NAME_RE.match(name)) or name.endswith(".git"):
        raise HubError(400, f"Invalid repo id {ns}/{name}")
    return f"{ns}/{name}"


def parse_token_spec(spec: str) -> tuple[str, str]:
    """`TOKEN` or `USER:TOKEN` -> (token, user); a bare token belongs to user ``user``."""
    user, sep, token = spec.partition(":")
    if not sep:
        return spec, "user"
    if not NAME_RE.match(user) or not token:
        raise ValueError(f"Bad token spec {spec!r}: expected TOKEN or USER:TOKEN")
    return token, user
