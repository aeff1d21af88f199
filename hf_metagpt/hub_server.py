"""A local Hugging Face Hub-compatible HTTP server, for tests and the offline demo.

It speaks the subset of the Hub's HTTP API that ``huggingface_hub``'s download, metadata and upload
paths use (repo create/delete, info, tree, paths-info, refs, commits, branches, tags, resolve with
Range, preupload, git-LFS basic transfer, NDJSON commits, pull-request refs), with Hub-like access
control for private repos. Point the client at it with ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1``,
both set *before* ``huggingface_hub`` is first imported (it reads them once at import).

Example:
    ```py
    >>> from hf_metagpt.hub_server import LocalHub
    >>> with LocalHub("./hub-data", tokens={"hf_local": "me"}) as hub:
    ...     print(hub.endpoint)   # e.g. http://127.0.0.1:54321
    ```

Storage (survives a restart with the same data folder)::

    data/blobs/git/ab/<git sha1>      regular files, named by their git blob id (their ETag)
    data/blobs/lfs/ab/<sha256>        LFS files, named by their sha256 (their ETag)
    data/repos/<type>s/<ns>/<name>/log.jsonl   append-only log of repo events (create, commit, ref, ...)
    data/tmp/                          partial uploads; emptied at start

This module is deliberately stdlib-only and must never import ``huggingface_hub``: tests start the
server before the client is first imported.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Iterable
from urllib.parse import parse_qs, quote, unquote, urlsplit

log = logging.getLogger(__name__)

__all__ = ["LocalHub", "Fault", "RequestRecord", "parse_token_spec"]

# Same threshold as the Hub: larger files must go through LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_CHUNK = 1024 * 1024
# One NDJSON line carries at most one regular (<= 10 MB, base64) file; anything far larger is abuse.
_MAX_NDJSON_LINE = 32 * 1024 * 1024
_MAX_JSON_BODY = 8 * 1024 * 1024

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PR_REF_RE = re.compile(r"^refs/pr/([1-9][0-9]*)$")

_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tflite *.tgz *.wasm "
    "*.xz *.zip *.zst *tfevents* *.gguf"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()


# --------------------------------------------------------------------------------------------------
# Small helpers


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub uses as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _clean_path(path: Any, *, allow_empty: bool = False) -> str:
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


def parse_token_spec(spec: str) -> tuple[str, str]:
    """`TOKEN` or `USER:TOKEN` -> (token, user); a bare token belongs to user ``user``."""
    user, sep, token = spec.partition(":")
    if not sep:
        return spec, "user"
    if not _NAME_RE.match(user) or not token:
        raise ValueError(f"Bad token spec {spec!r}: expected TOKEN or USER:TOKEN")
    return token, user


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error": ...}`` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, *, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


# --------------------------------------------------------------------------------------------------
# Public records


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

    def _matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.pattern.search(path) is not None


@dataclass
class RequestRecord:
    """One request as seen by the server (never headers with credentials)."""

    method: str
    path: str  # URL path, unquoted, without query string
    query: str
    range: str | None
    authenticated_as: str | None
    status: int | None = None


# --------------------------------------------------------------------------------------------------
# Storage


@dataclass
class _Repo:
    type: str
    id: str
    owner: str
    private: bool
    created_at: float
    dir: Path
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" -> commit id
    commits: dict[str, dict] = field(default_factory=dict)
    pr_count: int = 0

    @property
    def url_id(self) -> str:
        return _URL_PREFIX[self.type] + self.id


class _Store:
    """Blobs, repos and their event logs on disk, mirrored in memory. All mutations under `lock`."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        for sub in ("blobs/git", "blobs/lfs", "repos", "tmp", "trash"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Leftovers of interrupted uploads or deletes are never visible; drop them.
        for sub in ("tmp", "trash"):
            for child in (root / sub).iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._load()

    # ---- blobs
    def blob_path(self, kind: str, oid: str) -> Path:
        if not (_SHA1_RE if kind == "git" else _SHA256_RE).match(oid):
            raise HubError(400, f"Invalid object id {oid!r}")
        return self.root / "blobs" / kind / oid[:2] / oid

    def has_lfs(self, oid: str, size: int | None = None) -> bool:
        try:
            p = self.blob_path("lfs", oid)
            return p.is_file() and (size is None or p.stat().st_size == size)
        except HubError:
            return False

    def _publish(self, tmp: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        try:  # make the rename durable
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _tmp_file(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    def put_regular(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        dest = self.blob_path("git", oid)
        if not dest.exists():
            tmp = self._tmp_file()
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._publish(tmp, dest)
        return oid

    def receive_lfs(self, body: "_BodyReader", oid: str, size: int) -> None:
        """Stream an upload to a temp file; publish it only if its sha256 and size match."""
        dest = self.blob_path("lfs", oid)
        tmp = self._tmp_file()
        digest, n = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                while True:
                    chunk = body.read(_CHUNK)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > size:
                        raise HubError(400, f"Upload is larger than the announced {size} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if n != size or digest.hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
            self._publish(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- repos
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.root / "repos" / (repo_type + "s") / ns / name

    def _append(self, repo: _Repo, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        with open(repo.dir / "log.jsonl", "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> None:
        for log_file in sorted((self.root / "repos").glob("*/*/*/log.jsonl")):
            type_dir, ns, name = log_file.parts[-4:-1]
            repo_type = _REPO_TYPES.get(type_dir)
            if repo_type is None:
                continue
            repo: _Repo | None = None
            good = 0
            with open(log_file, "rb") as f:
                for raw in f:
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        break  # torn last write: everything after it is dropped
                    if not raw.endswith(b"\n"):
                        break
                    good += len(raw)
                    kind = ev.get("event")
                    if kind == "create":
                        repo = _Repo(repo_type, f"{ns}/{name}", ev["owner"], ev["private"], ev["created_at"],
                                     log_file.parent)
                    elif repo is None:
                        break
                    elif kind == "commit":
                        repo.commits[ev["commit"]["id"]] = ev["commit"]
                    elif kind == "ref":
                        if ev["target"] is None:
                            repo.refs.pop(ev["ref"], None)
                        else:
                            repo.refs[ev["ref"]] = ev["target"]
                    elif kind == "settings":
                        repo.private = ev["private"]
                    elif kind == "pr":
                        repo.pr_count = max(repo.pr_count, ev["num"])
            if good != log_file.stat().st_size:
                with open(log_file, "r+b") as f:
                    f.truncate(good)
            if repo is not None:
                self.repos[(repo_type, repo.id)] = repo
        log.debug("local hub: loaded %d repos from %s", len(self.repos), self.root)

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> _Repo:
        with self.lock:
            d = self._repo_dir(repo_type, repo_id)
            d.mkdir(parents=True, exist_ok=True)
            (d / "log.jsonl").unlink(missing_ok=True)
            repo = _Repo(repo_type, repo_id, owner, private, time.time(), d)
            self._append(repo, {"event": "create", "owner": owner, "private": private,
                                "created_at": repo.created_at})
            # Like the Hub, a new repo starts with one commit holding the default .gitattributes.
            oid = self.put_regular(DEFAULT_GITATTRIBUTES)
            files = {".gitattributes": {"oid": oid, "size": len(DEFAULT_GITATTRIBUTES)}}
            commit = self.new_commit(repo, None, files, "initial commit", "", owner)
            self.set_ref(repo, "refs/heads/main", commit["id"])
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo: _Repo) -> None:
        with self.lock:
            self.repos.pop((repo.type, repo.id), None)
            trash = self.root / "trash" / uuid.uuid4().hex
            os.replace(repo.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def new_commit(self, repo: _Repo, parent: str | None, files: dict, title: str, message: str,
                   author: str) -> dict:
        with self.lock:
            ts = time.time()
            body = {"parents": [parent] if parent else [], "files": files, "title": title, "message": message,
                    "author": author, "date": _iso(ts), "nonce": time.time_ns()}
            commit = {"id": hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest(), **body}
            self._append(repo, {"event": "commit", "commit": commit})
            repo.commits[commit["id"]] = commit
            return commit

    def set_ref(self, repo: _Repo, ref: str, target: str | None) -> None:
        with self.lock:
            self._append(repo, {"event": "ref", "ref": ref, "target": target})
            if target is None:
                repo.refs.pop(ref, None)
            else:
                repo.refs[ref] = target

    def set_private(self, repo: _Repo, private: bool) -> None:
        with self.lock:
            self._append(repo, {"event": "settings", "private": private})
            repo.private = private

    def next_pr(self, repo: _Repo) -> int:
        with self.lock:
            repo.pr_count += 1
            self._append(repo, {"event": "pr", "num": repo.pr_count})
            return repo.pr_count


def _resolve(repo: _Repo, revision: str) -> tuple[str, str | None]:
    """revision (branch, tag, full ref, refs/pr/N or a commit id) -> (commit id, full ref name or None)."""
    for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
        if ref.startswith("refs/") and ref in repo.refs:
            return repo.refs[ref], ref
    if _SHA1_RE.match(revision) and revision in repo.commits:
        return revision, None
    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# --------------------------------------------------------------------------------------------------
# HTTP plumbing


class _IncompleteBody(Exception):
    pass


class _BodyReader:
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
                raise _IncompleteBody("client went away mid-body")
            self._left -= len(data)
            self.done = self._left == 0
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            if not line:
                raise _IncompleteBody("client went away mid-body")
            self._chunk_left = int(line.split(b";")[0].strip() or b"0", 16)
            if self._chunk_left == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return b""
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise _IncompleteBody("client went away mid-body")
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
            return self.read_all(_MAX_JSON_BODY)
        while not self.done:
            data = self._raw(n)
            if data:
                return data
        return b""

    def read_all(self, limit: int) -> bytes:
        out = bytearray(self._buf)
        self._buf.clear()
        while not self.done:
            out += self._raw(_CHUNK)
            if len(out) > limit:
                raise HubError(413, "Request body too large")
        return bytes(out)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buf and not self.done:
            if len(self._buf) > limit:
                raise HubError(413, "NDJSON line too long")
            self._buf += self._raw(_CHUNK)
        i = self._buf.find(b"\n")
        end = len(self._buf) if i < 0 else i + 1
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def drain(self) -> None:
        while not self.done:
            self._raw(_CHUNK)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, hub: "LocalHub"):
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address) -> None:
        # Clients that vanish mid-request (or faults that drop them) are routine here.
        log.debug("local hub: connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-metagpt-local-hub/1"
    server: _Server

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
        self._rec: RequestRecord | None = None
        self._drop_after: int | None = None
        self.body = _BodyReader(self.rfile, self.headers)
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query, keep_blank_values=True)
        hub: LocalHub = self.server.hub
        user: str | None = None
        try:
            user = hub._authenticate(self.headers.get("Authorization"))
            hub._record(self, user, None)
            if hub._apply_fault(self):
                return
            hub._route(self, user)
        except HubError as err:
            self.send_error_json(err)
        except _IncompleteBody:
            self.close_connection = True
            log.debug("local hub: %s %s: incomplete request body", self.command, unquote(self.raw_path))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the server must not kill the connection silently
            log.exception("local hub: internal error on %s %s", self.command, unquote(self.raw_path))
            self.send_error_json(HubError(500, f"Internal error: {type(exc).__name__}"))
        finally:
            hub._record(self, user, self._status)
            if not self.body.done:
                self.close_connection = True  # unread body bytes would corrupt the next request

    def send_bytes(self, status: int, body: bytes = b"", headers: dict | None = None,
                   content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not self.body.done:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

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
        raw = self.body.read_all(_MAX_JSON_BODY)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.endpoint


# --------------------------------------------------------------------------------------------------
# The server


class LocalHub:
    """A local Hub-compatible server: repos, commits, LFS and access control, in a data folder.

    Args:
        data_dir: folder holding blobs and repo logs; reusing it after a restart keeps every repo.
        host: interface to bind (default loopback only).
        port: TCP port; 0 picks a free one.
        tokens: ``{token: user name}`` accepted as ``Authorization: Bearer <token>``.
        orgs: ``{org name: [member user names]}``; members may write in the org's namespace.

    Example:
        ```py
        >>> hub = LocalHub(tmp_path, tokens={"hf_x": "alice"})
        >>> endpoint = hub.start()
        >>> hub.inject_fault(r"/resolve/", status=503, times=1)   # next download answers 503 once
        >>> hub.stop()
        ```
    """

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 tokens: dict[str, str] | None = None, orgs: dict[str, Iterable[str]] | None = None):
        self.data_dir = Path(data_dir)
        self.host, self.port = host, port
        self.tokens: dict[str, str] = dict(tokens or {})
        self.orgs: dict[str, set[str]] = {k: set(v) for k, v in (orgs or {}).items()}
        self._store: _Store | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[Fault] = []
        self._requests: list[RequestRecord] = []
        self._meta_lock = threading.Lock()
        # Signs LFS upload URLs: the client PUTs to them without credentials, like to a bucket.
        self._secret = secrets.token_bytes(32)

    # ---- lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL to use as HF_ENDPOINT, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> str:
        """Load the data folder, serve in a background thread, and return the endpoint URL."""
        if self._server is not None:
            return self.endpoint
        self._store = _Store(self.data_dir)
        self._server = _Server((self.host, self.port), self)
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
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.conn_lock:
            conns = list(server.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
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
        if not _NAME_RE.match(user):
            raise ValueError(f"Invalid user name {user!r}")
        self.tokens[token] = user

    def add_org(self, org: str, members: Iterable[str]) -> None:
        """Create (or extend) an organization whose members may write in its namespace."""
        self.orgs.setdefault(org, set()).update(members)

    # ---- fault injection and request log
    def inject_fault(self, path_regex: str, *, status: int | None = 500, times: int | None = 1,
                     method: str | None = None, delay: float = 0.0, drop: bool = False,
                     drop_after: int | None = None) -> Fault:
        """Make requests whose unquoted URL path matches `path_regex` fail.

        Answers `status` with a JSON error (or closes the connection without an answer if `drop`),
        after sleeping `delay` seconds, for the next `times` matching requests (None: forever).
        `drop_after=N`: serve the file but cut the connection after N body bytes (status ignored).
        Returns the `Fault`; its `hits` counts the requests it caught.
        """
        fault = Fault(re.compile(path_regex), None if drop_after is not None else status, times, method, delay,
                      drop, drop_after=drop_after)
        with self._meta_lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._meta_lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests served so far (method, unquoted path, query, Range header, user, status)."""
        with self._meta_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._meta_lock:
            self._requests.clear()

    def _record(self, h: _Handler, user: str | None, status: int | None) -> None:
        # Recorded before the answer (so a caller sees it as soon as its call returns), then the
        # status is filled in. Upload URLs carry a signature in their query: never keep it.
        if h._rec is not None:
            h._rec.status, h._rec.authenticated_as = status, user
            return
        query = "" if h.raw_path.startswith("/_lfs/") else urlsplit(h.path).query
        h._rec = RequestRecord(h.command, unquote(h.raw_path), query, h.headers.get("Range"), user, status)
        with self._meta_lock:
            self._requests.append(h._rec)

    def _apply_fault(self, h: _Handler) -> bool:
        path = unquote(h.raw_path)
        with self._meta_lock:
            fault = next((f for f in self._faults if f._matches(h.command, path)), None)
            if fault is None:
                return False
            fault.hits += 1
            if fault.times is not None:
                fault.times -= 1
        if fault.delay:
            time.sleep(fault.delay)
        h._drop_after = fault.drop_after
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

    # ---- auth
    def _authenticate(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write_ns(self, user: str | None, ns: str) -> bool:
        return user is not None and (user == ns or user in self.orgs.get(ns, ()))

    def _require_user(self, user: str | None) -> str:
        if user is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to do this")
        return user

    def _repo_for_read(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        assert self._store is not None
        repo = self._store.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write_ns(user, repo_id.split("/")[0])):
            # Like the Hub: unauthenticated callers get 401, others 404; neither learns if it exists.
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        self._require_user(user)
        repo = self._repo_for_read(repo_type, repo_id, user)
        if not self._can_write_ns(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo

    # ---- routing
    def _route(self, h: _Handler, user: str | None) -> None:
        raw_parts = h.raw_path.split("/")[1:]
        parts = [unquote(p) for p in raw_parts]
        if any(p in (".", "..") for p in parts):
            raise HubError(400, "Invalid path: '.' and '..' segments are not allowed")
        m = h.command
        if parts[:1] == ["api"]:
            return self._route_api(h, m, parts[1:], user)
        if parts[:1] == ["_lfs"] and len(parts) == 2 and m == "PUT":
            return self._lfs_put(h, parts[1])
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces") and len(parts) >= 3:
            repo_type = _REPO_TYPES[parts[0]]
            parts = parts[1:]
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = self._repo_id(parts[0], parts[1][: -len(".git")])
            if parts[5:] == ["batch"] and m == "POST":
                return self._lfs_batch(h, repo_type, repo_id, user)
            if parts[5:] == ["verify"] and m == "POST":
                return self._lfs_verify(h, repo_type, repo_id, user)
        if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(h, repo_type, self._repo_id(parts[0], parts[1]), parts[3],
                                      "/".join(parts[4:]), user)
        raise HubError(404, "Not Found", "EndpointNotFound")

    @staticmethod
    def _repo_id(ns: str, name: str) -> str:
        if not (_NAME_RE.match(ns) and _NAME_RE.match(name)) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo id {ns}/{name}")
        return f"{ns}/{name}"

    def _route_api(self, h: _Handler, m: str, parts: list[str], user: str | None) -> None:
        if parts == ["whoami-v2"] and m == "GET":
            return self._whoami(h, user)
        if parts == ["validate-yaml"] and m == "POST":
            h.json_body()
            return h.send_json({"errors": [], "warnings": []})
        if parts == ["repos", "create"] and m == "POST":
            return self._create_repo(h, user)
        if parts == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo(h, user)
        if len(parts) == 2 and parts[0] in _REPO_TYPES:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if len(parts) >= 3 and parts[0] in _REPO_TYPES:
            repo_type, repo_id = _REPO_TYPES[parts[0]], self._repo_id(parts[1], parts[2])
            op, rest = (parts[3] if len(parts) > 3 else ""), parts[4:]
            rev = "/".join(rest) if rest else "main"
            if op == "" and m == "GET":
                return self._info(h, repo_type, repo_id, "main", user)
            if op == "revision" and rest and m == "GET":
                return self._info(h, repo_type, repo_id, rev, user)
            if op == "tree" and m == "GET":
                return self._tree(h, repo_type, repo_id, rest[0] if rest else "main", "/".join(rest[1:]), user)
            if op == "paths-info" and rest and m == "POST":
                return self._paths_info(h, repo_type, repo_id, rev, user)
            if op == "refs" and not rest and m == "GET":
                return self._refs(h, repo_type, repo_id, user)
            if op == "commits" and m == "GET":
                return self._commits(h, repo_type, repo_id, rev, user)
            if op == "branch" and rest and m in ("POST", "DELETE"):
                return self._branch(h, repo_type, repo_id, rev, user)
            if op == "tag" and rest and m in ("POST", "DELETE"):
                return self._tag(h, repo_type, repo_id, rev, user)
            if op == "preupload" and rest and m == "POST":
                return self._preupload(h, repo_type, repo_id, rev, user)
            if op == "commit" and rest and m == "POST":
                return self._commit(h, repo_type, repo_id, rev, user)
            if op == "settings" and not rest and m == "PUT":
                return self._settings(h, repo_type, repo_id, user)
            if op == "safetensors-metadata" and rest and m == "GET":
                return self._safetensors_metadata(h, repo_type, repo_id, "/".join(rest), user)
        raise HubError(404, "Not Found", "EndpointNotFound")

    # ---- account endpoints
    def _whoami(self, h: _Handler, user: str | None) -> None:
        user = self._require_user(user)
        orgs = [{"type": "org", "name": o, "fullname": o} for o, members in sorted(self.orgs.items())
                if user in members]
        h.send_json({"type": "user", "id": user, "name": user, "fullname": user, "email": None,
                     "emailVerified": True, "canPay": False, "isPro": False, "orgs": orgs,
                     "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})

    def _create_repo(self, h: _Handler, user: str | None) -> None:
        user = self._require_user(user)
        body = h.json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        ns = body.get("organization") or user
        repo_id = self._repo_id(ns, str(body.get("name") or ""))
        if not self._can_write_ns(user, ns):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {ns!r}")
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        url = f"{h.base_url()}/{_URL_PREFIX[repo_type]}{repo_id}"
        assert self._store is not None
        with self._store.lock:
            if (repo_type, repo_id) in self._store.repos:
                raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            self._store.create_repo(repo_type, repo_id, user, private)
        h.send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, h: _Handler, user: str | None) -> None:
        user = self._require_user(user)
        body = h.json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo = self._repo_for_write(repo_type, self._repo_id(body.get("organization") or user,
                                                             str(body.get("name") or "")), user)
        assert self._store is not None
        self._store.delete_repo(repo)
        h.send_json({})

    def _settings(self, h: _Handler, repo_type: str, repo_id: str, user: str | None) -> None:
        repo = self._repo_for_write(repo_type, repo_id, user)
        body = h.json_body()
        if "private" in body or "visibility" in body:
            private = body["visibility"] == "private" if "visibility" in body else bool(body["private"])
            assert self._store is not None
            self._store.set_private(repo, private)
        h.send_json({"private": repo.private})

    # ---- read endpoints
    def _snapshot(self, repo_type: str, repo_id: str, rev: str, user: str | None) -> tuple[_Repo, dict]:
        assert self._store is not None
        with self._store.lock:
            repo = self._repo_for_read(repo_type, repo_id, user)
            sha, _ = _resolve(repo, rev)
            return repo, repo.commits[sha]

    @staticmethod
    def _file_entry(path: str, e: dict) -> dict:
        out = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e.get("lfs"):
            out["lfs"] = dict(e["lfs"])
        return out

    @staticmethod
    def _dir_entry(path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0,
                "path": path}

    def _info(self, h: _Handler, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
        repo, commit = self._snapshot(repo_type, repo_id, rev, user)
        blobs = h.query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit["files"].items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:  # the Hub sends sizes and blob ids only when asked (files_metadata=True)
                s.update(size=e["size"], blobId=e["oid"])
                if e.get("lfs"):
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"],
                                "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
        ns = repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
            "author": ns, "sha": commit["id"], "lastModified": commit["date"], "createdAt": _iso(repo.created_at),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings, "usedStorage": sum(e["size"] for e in commit["files"].values()),
        }
        if repo_type == "model":
            info.update(modelId=repo_id, library_name=None)
        h.send_json(info)

    def _tree(self, h: _Handler, repo_type: str, repo_id: str, rev: str, path: str, user: str | None) -> None:
        _, commit = self._snapshot(repo_type, repo_id, rev, user)
        path = _clean_path(path.strip("/"), allow_empty=True)
        recursive = h.query.get("recursive", [""])[0].lower() in ("1", "true")
        files = commit["files"]
        prefix = f"{path}/" if path else ""
        if path and path in files:
            raise HubError(404, f"{path} is a file, not a directory", "EntryNotFound")
        dirs, out = set(), []
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(rel[:depth]))
            if recursive or len(rel) == 1:
                out.append(self._file_entry(p, e))
        if path and not out and not dirs:
            raise HubError(404, f"{path} does not exist at this revision", "EntryNotFound")
        h.send_json([self._dir_entry(d) for d in sorted(dirs)] + out)

    def _paths_info(self, h: _Handler, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
        raw = h.body.read_all(_MAX_JSON_BODY)
        if (h.headers.get("Content-Type") or "").startswith("application/json"):
            paths = json.loads(raw or b"{}").get("paths", [])
        else:
            paths = parse_qs(raw.decode(), keep_blank_values=True).get("paths", [])
        _, commit = self._snapshot(repo_type, repo_id, rev, user)
        files, out = commit["files"], []
        for p in paths:
            p = _clean_path(str(p).strip("/"))
            if p in files:
                out.append(self._file_entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append(self._dir_entry(p))
        h.send_json(out)

    def _refs(self, h: _Handler, repo_type: str, repo_id: str, user: str | None) -> None:
        assert self._store is not None
        with self._store.lock:
            repo = self._repo_for_read(repo_type, repo_id, user)
            refs = sorted(repo.refs.items())
        def items(prefix: str) -> list[dict]:
            return [{"name": r[len(prefix):], "ref": r, "targetCommit": t} for r, t in refs if r.startswith(prefix)]
        out: dict[str, Any] = {"branches": items("refs/heads/"), "tags": items("refs/tags/"), "converts": []}
        if h.query.get("include_prs", [""])[0] in ("1", "true"):
            out["pullRequests"] = [{"name": r, "ref": r, "targetCommit": t} for r, t in refs
                                   if r.startswith("refs/pr/")]
        h.send_json(out)

    def _commits(self, h: _Handler, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
        assert self._store is not None
        repo, commit = self._snapshot(repo_type, repo_id, rev, user)
        out: list[dict] = []
        while commit is not None:
            out.append({"id": commit["id"], "title": commit["title"], "message": commit["message"],
                        "date": commit["date"], "authors": [{"user": commit["author"], "avatar": None}]})
            parents = commit["parents"]
            commit = repo.commits.get(parents[0]) if parents else None
        h.send_json(out)

    def _resolve_file(self, h: _Handler, repo_type: str, repo_id: str, rev: str, path: str,
                      user: str | None) -> None:
        path = _clean_path(path)
        _, commit = self._snapshot(repo_type, repo_id, rev, user)
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
        assert self._store is not None
        lfs = entry.get("lfs")
        blob = self._store.blob_path("lfs", lfs["oid"]) if lfs else self._store.blob_path("git", entry["oid"])
        size = entry["size"]
        etag = lfs["oid"] if lfs else entry["oid"]
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if rng and h.command == "GET":
            try:
                parsed = _parse_range(rng, size)
            except HubError as err:
                err.headers = {**headers, **err.headers}
                raise
            if parsed is not None:
                (start, end), status = parsed, 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        h._status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            with open(blob, "rb") as f:
                cut = h._drop_after
                if cut is None and length:
                    # Zero-copy (sendfile): the Python read/write loop cost a core on 2-core
                    # machines, which a merge by ID running beside the download needs.
                    h.wfile.flush()
                    sent = h.connection.sendfile(f, start, length)
                    if sent != length:
                        raise OSError(f"blob {blob.name} is shorter than recorded")
                    return
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        raise OSError(f"blob {blob.name} is shorter than recorded")
                    if cut is not None and len(chunk) >= cut:
                        h.wfile.write(chunk[:cut])
                        h.wfile.flush()
                        h.connection.shutdown(socket.SHUT_RDWR)
                        raise ConnectionResetError("injected fault: connection dropped mid-body")
                    if cut is not None:
                        cut -= len(chunk)
                    h.wfile.write(chunk)
                    left -= len(chunk)
        except OSError as exc:
            # Headers are gone already: the only honest signal left is a short, closed response.
            h.close_connection = True
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                log.error("local hub: could not stream %s: %s", path, exc)

    def _safetensors_metadata(self, h: _Handler, repo_type: str, repo_id: str, filename: str,
                              user: str | None) -> None:
        """`{index, headers}` of a sharded safetensors repo at main (get_sharded_safetensors_metadata)."""
        _, commit = self._snapshot(repo_type, repo_id, "main", user)
        files = commit["files"]
        assert self._store is not None

        def read(path: str, n: int | None = None, offset: int = 0) -> bytes:
            e = files.get(path)
            if e is None:
                raise HubError(404, f"{path} not found", "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
            blob = self._store.blob_path("lfs", e["lfs"]["oid"]) if e.get("lfs") else \
                self._store.blob_path("git", e["oid"])
            with open(blob, "rb") as f:
                f.seek(offset)
                return f.read(-1 if n is None else n)

        index = json.loads(read(_clean_path(filename)))
        headers = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            n = int.from_bytes(read(_clean_path(shard), 8), "little")
            if n > 100 * 1024 * 1024:
                raise HubError(400, f"{shard}: safetensors header too large")
            headers[shard] = json.loads(read(shard, n, 8))
        h.send_json({"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})

    # ---- refs
    def _branch(self, h: _Handler, repo_type: str, repo_id: str, name: str, user: str | None) -> None:
        repo = self._repo_for_write(repo_type, repo_id, user)
        if not _BRANCH_RE.match(name) or ".." in name or name.startswith("refs/") or _SHA1_RE.match(name):
            raise HubError(400, f"Invalid branch name {name!r}")
        body = h.json_body() if h.command == "POST" else (h.body.drain() or {})
        ref = f"refs/heads/{name}"
        assert self._store is not None
        with self._store.lock:
            if h.command == "DELETE":
                if name == "main":
                    raise HubError(403, "The main branch cannot be deleted")
                if ref not in repo.refs:
                    raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
                self._store.set_ref(repo, ref, None)
            else:
                if ref in repo.refs:
                    raise HubError(409, f"Reference already exists: {ref}")
                sha, _ = _resolve(repo, str(body.get("startingPoint") or "main"))
                self._store.set_ref(repo, ref, sha)
        h.send_json({})

    def _tag(self, h: _Handler, repo_type: str, repo_id: str, rev_or_tag: str, user: str | None) -> None:
        repo = self._repo_for_write(repo_type, repo_id, user)
        assert self._store is not None
        if h.command == "DELETE":
            h.body.drain()
            ref = f"refs/tags/{rev_or_tag}"
            with self._store.lock:
                if ref not in repo.refs:
                    raise HubError(404, f"Tag {rev_or_tag} not found", "RevisionNotFound")
                self._store.set_ref(repo, ref, None)
            return h.send_json({})
        tag = str(h.json_body().get("tag") or "")
        if not _BRANCH_RE.match(tag) or ".." in tag or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name {tag!r}")
        with self._store.lock:
            ref = f"refs/tags/{tag}"
            if ref in repo.refs:
                raise HubError(409, f"Tag already exists: {tag}")
            sha, _ = _resolve(repo, rev_or_tag)
            self._store.set_ref(repo, ref, sha)
        h.send_json({})

    # ---- uploads
    def _lfs_patterns(self, files: dict) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None or entry.get("lfs"):
            return list(_LFS_PATTERNS)
        assert self._store is not None
        text = self._store.blob_path("git", entry["oid"]).read_text(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]

    def _preupload(self, h: _Handler, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
        body = h.json_body()
        repo = self._repo_for_write(repo_type, repo_id, user)
        assert self._store is not None
        with self._store.lock:
            sha, _ = _resolve(repo, rev)
            files = repo.commits[sha]["files"]
        patterns = self._lfs_patterns(files)
        out = []
        for f in body.get("files") or []:
            path = _clean_path(f.get("path"))
            size = int(f.get("size") or 0)
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                raise HubError(400, f"Invalid base64 sample for {path}") from None
            name = path.rsplit("/", 1)[-1]
            # The Hub's rule: LFS for big files, binary-looking samples and .gitattributes LFS patterns.
            lfs = (size > LFS_SIZE_THRESHOLD or b"\x00" in sample
                   or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns))
            item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = files.get(path)
            if existing is not None:
                item["oid"] = existing["lfs"]["oid"] if existing.get("lfs") else existing["oid"]
            out.append(item)
        h.send_json({"files": out, "commitOid": sha})

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def _lfs_batch(self, h: _Handler, repo_type: str, repo_id: str, user: str | None) -> None:
        body = h.json_body()
        self._repo_for_write(repo_type, repo_id, user)
        if body.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' LFS operation is supported")
        assert self._store is not None
        base, objects = h.base_url(), []
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self._store.has_lfs(oid, size):
                item["actions"] = {
                    "upload": {"href": f"{base}/_lfs/{oid}?size={size}&sig={self._sign(oid, size)}"},
                    "verify": {"href": f"{base}/{_URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        h.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                    content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, h: _Handler, oid: str) -> None:
        try:
            size = int(h.query.get("size", ["-1"])[0])
        except ValueError:
            size = -1
        sig = h.query.get("sig", [""])[0]
        if size < 0 or not _SHA256_RE.match(oid) or not hmac.compare_digest(sig, self._sign(oid, size)):
            raise HubError(403, "Invalid or expired upload URL")
        assert self._store is not None
        if self._store.has_lfs(oid, size):
            h.body.drain()
        else:
            self._store.receive_lfs(h.body, oid, size)
        h.send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _lfs_verify(self, h: _Handler, repo_type: str, repo_id: str, user: str | None) -> None:
        body = h.json_body()
        self._repo_for_write(repo_type, repo_id, user)
        assert self._store is not None
        if not self._store.has_lfs(str(body.get("oid")), body.get("size")):
            raise HubError(404, "LFS object not found (or size mismatch)")
        h.send_json({"success": True})

    def _commit(self, h: _Handler, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
        repo = self._repo_for_write(repo_type, repo_id, user)
        assert user is not None and self._store is not None
        create_pr = h.query.get("create_pr", [""])[0] in ("1", "true")
        header: dict | None = None
        ops: list[tuple[str, dict]] = []
        while True:
            line = h.body.readline(_MAX_NDJSON_LINE)
            if not line:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, "Invalid NDJSON commit payload") from None
            if key == "header":
                header = value
            elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                ops.append((key, self._prepare_op(key, value)))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        if header is None:
            raise HubError(400, "Commit payload has no header line")
        pr_url = None
        with self._store.lock:
            if create_pr:
                base, _ = _resolve(repo, rev)
                ref = None
            else:
                base, ref = _resolve(repo, rev)
                if ref is None or ref.startswith("refs/tags/"):
                    raise HubError(400, f"Invalid rev id: {rev} is not a branch; commit to a branch or a PR")
            parent = header.get("parentCommit")
            if parent and parent != base:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[base]["files"])
            for key, value in ops:
                self._apply_op(files, key, value)
            commit = self._store.new_commit(repo, base, files, str(header.get("summary") or "Upload"),
                                            str(header.get("description") or ""), user)
            if create_pr:
                num = self._store.next_pr(repo)
                ref = f"refs/pr/{num}"
                pr_url = f"{h.base_url()}/{repo.url_id}/discussions/{num}"
            assert ref is not None
            self._store.set_ref(repo, ref, commit["id"])
        out: dict[str, Any] = {"success": True, "commitOid": commit["id"], "hookOutput": "",
                               "commitUrl": f"{h.base_url()}/{repo.url_id}/commit/{commit['id']}"}
        if pr_url:
            out["pullRequestUrl"] = pr_url
        h.send_json(out)

    def _prepare_op(self, key: str, value: dict) -> dict:
        """Validate one operation and store regular content, before taking the repo lock."""
        if not isinstance(value, dict):
            raise HubError(400, f"Invalid {key} operation")
        assert self._store is not None
        if key == "deletedFolder":
            return {"path": _clean_path(str(value.get("path", "")).rstrip("/"))}
        path = _clean_path(value.get("path"))
        if key == "deletedFile":
            return {"path": path}
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, "Only base64 encoding is supported for file operations")
            try:
                data = base64.b64decode(value.get("content") or "", validate=True)
            except ValueError:
                raise HubError(400, f"Invalid base64 content for {path}") from None
            return {"path": path, "entry": {"oid": self._store.put_regular(data), "size": len(data)}}
        oid = str(value.get("oid"))
        if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(oid):
            raise HubError(400, f"Invalid LFS oid for {path}")
        blob = self._store.blob_path("lfs", oid)
        if not blob.is_file():
            raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                                f"exist: {path} ({oid})")
        size = blob.stat().st_size
        if value.get("size") is not None and value["size"] != size:
            raise HubError(422, f"LFS object {oid} has size {size}, not {value['size']}")
        pointer = _lfs_pointer(oid, size)
        return {"path": path, "entry": {"oid": git_blob_sha1(pointer), "size": size,
                                        "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)}}}

    @staticmethod
    def _apply_op(files: dict, key: str, value: dict) -> None:
        path = value["path"]
        if key in ("file", "lfsFile"):
            if any(f.startswith(path + "/") for f in files) or any(
                    "/".join(path.split("/")[:i]) in files for i in range(1, path.count("/") + 1)):
                raise HubError(400, f"{path} conflicts with an existing file or folder")
            files[path] = value["entry"]
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        else:
            doomed = [f for f in files if f.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for f in doomed:
                del files[f]


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The first range of a `bytes=` header, clipped to the file; None to ignore the header.

    Raises a 416 `HubError` when the range starts past the end of the file.
    """
    unit, _, spec = header.partition("=")
    first = spec.split(",")[0].strip()
    a, _, b = first.partition("-")
    if unit.strip().lower() != "bytes" or not (a.isdigit() or b.isdigit()) or (b and not b.isdigit()):
        return None
    if a == "":
        start, end = max(0, size - int(b)), size - 1
        unsatisfiable = int(b) == 0 or size == 0
    else:
        start, end = int(a), (int(b) if b else max(size - 1, int(a)))
        if end < start:
            return None
        unsatisfiable = start >= size
    if unsatisfiable:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)
