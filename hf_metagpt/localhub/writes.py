"""Write endpoints of the local Hub: whoami, repo create/delete/settings, branches, tags, preupload, commits."""

from __future__ import annotations

import base64
import fnmatch
import json
from typing import Any

from .access import Context
from .exchange import Exchange
from .common import (
    BRANCH_RE,
    LFS_PATTERNS,
    LFS_SIZE_THRESHOLD,
    MAX_NDJSON_LINE,
    SHA1_RE,
    SHA256_RE,
    URL_PREFIX,
    HubError,
    clean_path,
    git_blob_sha1,
    lfs_pointer,
    repo_id_of,
)
from .storage import resolve


def whoami(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    orgs = [{"type": "org", "name": o, "fullname": o} for o, members in sorted(ctx.access.orgs.items())
            if user in members]
    h.send_json({"type": "user", "id": user, "name": user, "fullname": user, "email": None,
                 "emailVerified": True, "canPay": False, "isPro": False, "orgs": orgs,
                 "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})


def create_repo(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    body = h.json_body()
    repo_type = body.get("type") or "model"
    if repo_type not in URL_PREFIX:
        raise HubError(400, f"Invalid repo type {repo_type!r}")
    ns = body.get("organization") or user
    repo_id = repo_id_of(ns, str(body.get("name") or ""))
    if not ctx.access.can_write_ns(user, ns):
        raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {ns!r}")
    private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
    url = f"{h.base_url()}/{URL_PREFIX[repo_type]}{repo_id}"
    with ctx.store.lock:
        if (repo_type, repo_id) in ctx.store.repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        ctx.store.create_repo(repo_type, repo_id, user, private)
    h.send_json({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    body = h.json_body()
    repo_type = body.get("type") or "model"
    if repo_type not in URL_PREFIX:
        raise HubError(400, f"Invalid repo type {repo_type!r}")
    repo = ctx.write(repo_type, repo_id_of(body.get("organization") or user,
                                                         str(body.get("name") or "")), user)
    ctx.store.delete_repo(repo)
    h.send_json({})


def settings(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    body = h.json_body()
    if "private" in body or "visibility" in body:
        private = body["visibility"] == "private" if "visibility" in body else bool(body["private"])
        ctx.store.set_private(repo, private)
    h.send_json({"private": repo.private})


def branch(ctx: Context, h: Exchange, repo_type: str, repo_id: str, name: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    if not BRANCH_RE.match(name) or ".." in name or name.startswith("refs/") or SHA1_RE.match(name):
        raise HubError(400, f"Invalid branch name {name!r}")
    body = h.json_body() if h.command == "POST" else (h.body.drain() or {})
    ref = f"refs/heads/{name}"
    with ctx.store.lock:
        if h.command == "DELETE":
            if name == "main":
                raise HubError(403, "The main branch cannot be deleted")
            if ref not in repo.refs:
                raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
            ctx.store.set_ref(repo, ref, None)
        else:
            if ref in repo.refs:
                raise HubError(409, f"Reference already exists: {ref}")
            sha, _ = resolve(repo, str(body.get("startingPoint") or "main"))
            ctx.store.set_ref(repo, ref, sha)
    h.send_json({})


def tag(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev_or_tag: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    if h.command == "DELETE":
        h.body.drain()
        ref = f"refs/tags/{rev_or_tag}"
        with ctx.store.lock:
            if ref not in repo.refs:
                raise HubError(404, f"Tag {rev_or_tag} not found", "RevisionNotFound")
            ctx.store.set_ref(repo, ref, None)
        return h.send_json({})
    tag = str(h.json_body().get("tag") or "")
    if not BRANCH_RE.match(tag) or ".." in tag or tag.startswith("refs/"):
        raise HubError(400, f"Invalid tag name {tag!r}")
    with ctx.store.lock:
        ref = f"refs/tags/{tag}"
        if ref in repo.refs:
            raise HubError(409, f"Tag already exists: {tag}")
        sha, _ = resolve(repo, rev_or_tag)
        ctx.store.set_ref(repo, ref, sha)
    h.send_json({})


def lfs_patterns(ctx: Context, files: dict) -> list[str]:
    entry = files.get(".gitattributes")
    if entry is None or entry.get("lfs"):
        return list(LFS_PATTERNS)
    text = ctx.store.blob_path("git", entry["oid"]).read_text(errors="replace")
    return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]


def preupload(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    body = h.json_body()
    repo = ctx.write(repo_type, repo_id, user)
    with ctx.store.lock:
        sha, _ = resolve(repo, rev)
        files = repo.commits[sha]["files"]
    patterns = lfs_patterns(ctx, files)
    out = []
    for f in body.get("files") or []:
        path = clean_path(f.get("path"))
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


def commit(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    assert user is not None
    create_pr = h.query.get("create_pr", [""])[0] in ("1", "true")
    header: dict | None = None
    ops: list[tuple[str, dict]] = []
    while True:
        line = h.body.readline(MAX_NDJSON_LINE)
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
            ops.append((key, prepare_op(ctx, key, value)))
        else:
            raise HubError(400, f"Unsupported commit operation {key!r}")
    if header is None:
        raise HubError(400, "Commit payload has no header line")
    pr_url = None
    with ctx.store.lock:
        if create_pr:
            base, _ = resolve(repo, rev)
            ref = None
        else:
            base, ref = resolve(repo, rev)
            if ref is None or ref.startswith("refs/tags/"):
                raise HubError(400, f"Invalid rev id: {rev} is not a branch; commit to a branch or a PR")
        parent = header.get("parentCommit")
        if parent and parent != base:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[base]["files"])
        for key, value in ops:
            apply_op(files, key, value)
        commit = ctx.store.new_commit(repo, base, files, str(header.get("summary") or "Upload"),
                                        str(header.get("description") or ""), user)
        if create_pr:
            num = ctx.store.next_pr(repo)
            ref = f"refs/pr/{num}"
            pr_url = f"{h.base_url()}/{repo.url_id}/discussions/{num}"
        assert ref is not None
        ctx.store.set_ref(repo, ref, commit["id"])
    out: dict[str, Any] = {"success": True, "commitOid": commit["id"], "hookOutput": "",
                           "commitUrl": f"{h.base_url()}/{repo.url_id}/commit/{commit['id']}"}
    if pr_url:
        out["pullRequestUrl"] = pr_url
    h.send_json(out)


def prepare_op(ctx: Context, key: str, value: dict) -> dict:
    """Validate one operation and store regular content, before taking the repo lock."""
    if not isinstance(value, dict):
        raise HubError(400, f"Invalid {key} operation")
    if key == "deletedFolder":
        return {"path": clean_path(str(value.get("path", "")).rstrip("/"))}
    path = clean_path(value.get("path"))
    if key == "deletedFile":
        return {"path": path}
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise HubError(400, "Only base64 encoding is supported for file operations")
        try:
            data = base64.b64decode(value.get("content") or "", validate=True)
        except ValueError:
            raise HubError(400, f"Invalid base64 content for {path}") from None
        return {"path": path, "entry": {"oid": ctx.store.put_regular(data), "size": len(data)}}
    oid = str(value.get("oid"))
    if value.get("algo", "sha256") != "sha256" or not SHA256_RE.match(oid):
        raise HubError(400, f"Invalid LFS oid for {path}")
    blob = ctx.store.blob_path("lfs", oid)
    if not blob.is_file():
        raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                            f"exist: {path} ({oid})")
    size = blob.stat().st_size
    if value.get("size") is not None and value["size"] != size:
        raise HubError(422, f"LFS object {oid} has size {size}, not {value['size']}")
    pointer = lfs_pointer(oid, size)
    return {"path": path, "entry": {"oid": git_blob_sha1(pointer), "size": size,
                                    "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)}}}


def apply_op(files: dict, key: str, value: dict) -> None:
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
