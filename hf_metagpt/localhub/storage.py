"""Storage of the local Hub: blobs, repos, commits and refs on disk, mirrored in memory.

Layout (survives a restart with the same data folder)::

    data/blobs/git/ab/<git sha1>      regular files, named by their git blob id (their ETag)
    data/blobs/lfs/ab/<sha256>        LFS files, named by their sha256 (their ETag)
    data/repos/<type>s/<ns>/<name>/log.jsonl   append-only log of repo events (create, commit, ref, ...)
    data/tmp/                          partial uploads; emptied at start
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from .xet import XetStore
from .common import (
    CHUNK,
    DEFAULT_GITATTRIBUTES,
    REPO_TYPES,
    SHA1_RE,
    SHA256_RE,
    URL_PREFIX,
    HubError,
    git_blob_sha1,
    iso,
    printable,
)

log = logging.getLogger(__name__)


@dataclass
class Repo:
    type: str
    id: str
    owner: str
    private: bool
    created_at: float
    dir: Path
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" -> commit id
    commits: dict[str, dict] = field(default_factory=dict)
    pr_count: int = 0
    # pull requests opened through the discussions API: num -> {title, author, date}
    prs: dict[int, dict] = field(default_factory=dict)
    # LFS objects this repo may hand out: uploaded through it (sha256 checked) or named by one of
    # its commits. Nothing else: the blob store is shared, access to a blob is not.
    lfs: set[str] = field(default_factory=set)
    # Gated like the Hub's licence-gated models: "auto" or "manual" (how requests are approved on
    # the Hub; here both need `grant`), or False. Files are then only for the owner and `granted`.
    gated: str | bool = False
    granted: set[str] = field(default_factory=set)

    @property
    def url_id(self) -> str:
        return URL_PREFIX[self.type] + self.id


class Store:
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
        self.repos: dict[tuple[str, str], Repo] = {}
        self._holders: dict[str, set[tuple[str, str]]] = {}  # LFS oid -> repos whose `lfs` holds it
        # Renamed repos and canonical IDs without a namespace (`gpt2`): (type, old id) -> current id.
        # The Hub answers their URLs with a 307 to the current ones.
        self.aliases: dict[tuple[str, str], str] = {}
        self.xet = XetStore(root / "xet")
        aliases = root / "aliases.json"
        if aliases.is_file():
            for t, old, new in json.loads(aliases.read_text()):
                self.aliases[(t, old)] = new
        self._load()

    def _save_aliases(self) -> None:
        tmp = self._tmp_file()
        tmp.write_text(json.dumps(sorted([t, old, new] for (t, old), new in self.aliases.items())))
        os.replace(tmp, self.root / "aliases.json")

    def add_alias(self, repo_type: str, old_id: str, new_id: str) -> None:
        """Make `old_id` (a former name, or a canonical name without namespace) redirect to `new_id`."""
        with self.lock:
            self.aliases[(repo_type, old_id)] = new_id
            for key, target in list(self.aliases.items()):  # chains of renames point at the last name
                if target == old_id and key[0] == repo_type:
                    self.aliases[key] = new_id
            self._save_aliases()

    def rename(self, repo: Repo, new_id: str) -> None:
        """Move a repo to `new_id` (like the Hub's repo settings); its old URLs redirect there."""
        with self.lock:
            if (repo.type, new_id) in self.repos:
                raise HubError(409, f"{new_id} already exists")
            d = self._repo_dir(repo.type, new_id)
            d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(repo.dir, d)
            old = repo.id
            self.repos.pop((repo.type, old))
            for holders in self._holders.values():
                if (repo.type, old) in holders:
                    holders.discard((repo.type, old))
                    holders.add((repo.type, new_id))
            repo.id, repo.dir = new_id, d
            self.repos[(repo.type, new_id)] = repo
            self.aliases.pop((repo.type, new_id), None)
            self.add_alias(repo.type, old, new_id)

    # ---- blobs
    def blob_path(self, kind: str, oid: str) -> Path:
        if not (SHA1_RE if kind == "git" else SHA256_RE).match(oid):
            raise HubError(400, f"Invalid object id {printable(repr(oid))}")
        return self.root / "blobs" / kind / oid[:2] / oid

    def lfs_readable(self, oid: str, size: int | None, can_read: Callable[[Repo], bool]) -> bool:
        """Whether a repo that `can_read` accepts holds this LFS object (of this size, if given).

        The only existence answer the server ever gives for a blob: never "stored somewhere".
        """
        with self.lock:
            repos = [self.repos.get(key) for key in self._holders.get(oid, ())]
            if not any(r is not None and oid in r.lfs and can_read(r) for r in repos):
                return False
        return self.has_lfs(oid, size)

    def grant_lfs(self, repo: Repo, oid: str) -> None:
        """Record that `repo` holds `oid` (its upload was checked); survives a restart."""
        with self.lock:
            if oid not in repo.lfs:
                self._append(repo, {"event": "lfs", "oid": oid})
                self._hold(repo, [oid])

    def _hold(self, repo: Repo, oids: Iterable[str]) -> None:
        for oid in oids:
            repo.lfs.add(oid)
            self._holders.setdefault(oid, set()).add((repo.type, repo.id))

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

    def receive_lfs(self, body: BinaryIO, oid: str, size: int) -> None:
        """Stream an upload to a temp file; publish it only if its sha256 and size match.

        Also when the blob is stored already: an upload proves its sender has the bytes, so it is
        always checked (a skipped check would hand out another repo's blob for the asking).
        """
        dest = self.blob_path("lfs", oid)
        tmp = self._tmp_file()
        digest, n = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                while True:
                    chunk = body.read(CHUNK)
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
            if not self.has_lfs(oid, size):
                self._publish(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- repos
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.root / "repos" / (repo_type + "s") / ns / name

    def _append(self, repo: Repo, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        with open(repo.dir / "log.jsonl", "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> None:
        for log_file in sorted((self.root / "repos").glob("*/*/*/log.jsonl")):
            type_dir, ns, name = log_file.parts[-4:-1]
            repo_type = REPO_TYPES.get(type_dir)
            if repo_type is None:
                continue
            repo: Repo | None = None
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
                        repo = Repo(repo_type, f"{ns}/{name}", ev["owner"], ev["private"], ev["created_at"],
                                     log_file.parent)
                    elif repo is None:
                        break
                    elif kind == "commit":
                        repo.commits[ev["commit"]["id"]] = ev["commit"]
                        self._hold(repo, _lfs_oids(ev["commit"]))
                    elif kind == "lfs":
                        self._hold(repo, [ev["oid"]])
                    elif kind == "ref":
                        if ev["target"] is None:
                            repo.refs.pop(ev["ref"], None)
                        else:
                            repo.refs[ev["ref"]] = ev["target"]
                    elif kind == "settings":
                        repo.private = ev["private"]
                    elif kind == "gated":
                        repo.gated = ev["mode"]
                    elif kind == "access":
                        (repo.granted.add if ev["granted"] else repo.granted.discard)(ev["user"])
                    elif kind == "pr":
                        repo.pr_count = max(repo.pr_count, ev["num"])
                        if "title" in ev:
                            repo.prs[ev["num"]] = {k: ev[k] for k in ("title", "author", "date")}
            if good != log_file.stat().st_size:
                with open(log_file, "r+b") as f:
                    f.truncate(good)
            if repo is not None:
                self.repos[(repo_type, repo.id)] = repo
        log.debug("local hub: loaded %d repos from %s", len(self.repos), self.root)

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> Repo:
        with self.lock:
            d = self._repo_dir(repo_type, repo_id)
            d.mkdir(parents=True, exist_ok=True)
            (d / "log.jsonl").unlink(missing_ok=True)
            repo = Repo(repo_type, repo_id, owner, private, time.time(), d)
            self._append(repo, {"event": "create", "owner": owner, "private": private,
                                "created_at": repo.created_at})
            # Like the Hub, a new repo starts with one commit holding the default .gitattributes.
            oid = self.put_regular(DEFAULT_GITATTRIBUTES)
            files = {".gitattributes": {"oid": oid, "size": len(DEFAULT_GITATTRIBUTES)}}
            commit = self.new_commit(repo, None, files, "initial commit", "", owner)
            self.set_ref(repo, "refs/heads/main", commit["id"])
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            self.repos.pop((repo.type, repo.id), None)
            for oid in repo.lfs:
                self._holders.get(oid, set()).discard((repo.type, repo.id))
            trash = self.root / "trash" / uuid.uuid4().hex
            os.replace(repo.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def new_commit(self, repo: Repo, parent: str | None, files: dict, title: str, message: str,
                   author: str) -> dict:
        with self.lock:
            ts = time.time()
            body = {"parents": [parent] if parent else [], "files": files, "title": title, "message": message,
                    "author": author, "date": iso(ts), "nonce": time.time_ns()}
            commit = {"id": hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest(), **body}
            self._append(repo, {"event": "commit", "commit": commit})
            repo.commits[commit["id"]] = commit
            self._hold(repo, _lfs_oids(commit))
            return commit

    def set_ref(self, repo: Repo, ref: str, target: str | None) -> None:
        with self.lock:
            self._append(repo, {"event": "ref", "ref": ref, "target": target})
            if target is None:
                repo.refs.pop(ref, None)
            else:
                repo.refs[ref] = target

    def set_private(self, repo: Repo, private: bool) -> None:
        with self.lock:
            self._append(repo, {"event": "settings", "private": private})
            repo.private = private

    def set_gated(self, repo: Repo, mode: str | bool) -> None:
        with self.lock:
            self._append(repo, {"event": "gated", "mode": mode})
            repo.gated = mode

    def set_access(self, repo: Repo, user: str, granted: bool) -> None:
        """Grant (or revoke) `user` access to a gated repo's files; survives a restart."""
        with self.lock:
            self._append(repo, {"event": "access", "user": user, "granted": granted})
            (repo.granted.add if granted else repo.granted.discard)(user)

    def next_pr(self, repo: Repo, title: str | None = None, author: str | None = None) -> int:
        with self.lock:
            repo.pr_count += 1
            event: dict = {"event": "pr", "num": repo.pr_count}
            if title is not None:
                event.update(title=title, author=author, date=iso(time.time()))
                repo.prs[repo.pr_count] = {k: event[k] for k in ("title", "author", "date")}
            self._append(repo, event)
            return repo.pr_count


def resolve(repo: Repo, revision: str) -> tuple[str, str | None]:
    """revision (branch, tag, full ref, refs/pr/N or a commit id) -> (commit id, full ref name or None)."""
    for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
        if ref.startswith("refs/") and ref in repo.refs:
            return repo.refs[ref], ref
    if SHA1_RE.match(revision) and revision in repo.commits:
        return revision, None
    raise HubError(404, f"Invalid rev id: {printable(revision)}", "RevisionNotFound")


def _lfs_oids(commit: dict) -> list[str]:
    return [e["lfs"]["oid"] for e in commit["files"].values() if e.get("lfs")]
