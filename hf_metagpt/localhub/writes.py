"""Write endpoints of the local Hub: whoami, repo create/delete/settings, branches, tags, preupload, commits."""

from __future__ import annotations

import base64
import fnmatch
from typing import Any

from .access import Context
from .common import (
    BRANCH_RE,
    LFS_PATTERNS,
    LFS_SIZE_THRESHOLD,
    MAX_COMMIT_BODY,
    MAX_COMMIT_OPS,
    MAX_LIST_ITEMS,
    MAX_MESSAGE_LEN,
    MAX_NDJSON_LINE,
    MAX_REVISION_LEN,
    SHA1_RE,
    SHA256_RE,
    URL_PREFIX,
    HubError,
    check_revision,
    clean_path,
    git_blob_sha1,
    lfs_pointer,
    printable,
    repo_id_of,
)
from .exchange import Exchange
from .schema import as_object, field, objects, parse_json, size_field
from .storage import resolve


def whoami(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    orgs = [{"type": "org", "name": o, "fullname": o} for o, members in sorted(ctx.access.orgs.items())
            if user in members]
    h.send_json({"type": "user", "id": user, "name": user, "fullname": user, "email": None,
                 "emailVerified": True, "canPay": False, "isPro": False, "orgs": orgs,
                 "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})


def _repo_type(body: dict, what: str) -> str:
    repo_type = field(body, "type", str, what, default="model")
    if repo_type not in URL_PREFIX:
        raise HubError(400, f"Invalid repo type {printable(repr(repo_type))}: use model, dataset or space")
    return repo_type


def _private(body: dict, what: str, default: bool | None) -> bool | None:
    visibility = field(body, "visibility", str, what)
    if visibility is not None:
        if visibility not in ("public", "private"):
            raise HubError(400, f"{what}: 'visibility' must be 'public' or 'private'")
        return visibility == "private"
    return field(body, "private", bool, what, default=default)


def create_repo(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    body = as_object(h.json_body(), "Repo creation request")
    repo_type = _repo_type(body, "Repo creation request")
    ns = field(body, "organization", str, "Repo creation request") or user
    repo_id = repo_id_of(ns, field(body, "name", str, "Repo creation request", required=True))
    if not ctx.access.can_write_ns(user, ns):
        raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {ns!r}")
    private = bool(_private(body, "Repo creation request", False))
    url = f"{h.base_url()}/{URL_PREFIX[repo_type]}{repo_id}"
    with ctx.store.lock:
        if (repo_type, repo_id) in ctx.store.repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        ctx.store.create_repo(repo_type, repo_id, user, private)
    h.send_json({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(ctx: Context, h: Exchange, user: str | None) -> None:
    user = ctx.access.require_user(user)
    body = as_object(h.json_body(), "Repo deletion request")
    repo_type = _repo_type(body, "Repo deletion request")
    ns = field(body, "organization", str, "Repo deletion request") or user
    repo = ctx.write(repo_type, repo_id_of(ns, field(body, "name", str, "Repo deletion request", required=True)),
                     user)
    ctx.store.delete_repo(repo)
    h.send_json({})


def settings(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    body = as_object(h.json_body(), "Repo settings")
    private = _private(body, "Repo settings", None)
    gated = body.get("gated")  # update_repo_settings(gated="auto" | "manual" | False)
    if gated is not None and gated is not False and gated not in ("auto", "manual"):
        raise HubError(400, "Repo settings: 'gated' must be 'auto', 'manual' or false")
    if private is not None:
        ctx.store.set_private(repo, private)
    if gated is not None:
        ctx.store.set_gated(repo, gated)
    h.send_json({"private": repo.private, "gated": repo.gated})


def branch(ctx: Context, h: Exchange, repo_type: str, repo_id: str, name: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    if not BRANCH_RE.match(name) or ".." in name or name.startswith("refs/") or SHA1_RE.match(name):
        raise HubError(400, f"Invalid branch name {printable(repr(name))}")
    if h.command == "POST":
        start = field(as_object(h.json_body(), "Branch request"), "startingPoint", str, "Branch request")
        start = check_revision(start) if start else "main"
    else:
        h.body.drain()
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
            sha, _ = resolve(repo, start)
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
    body = as_object(h.json_body(), "Tag request")
    tag = field(body, "tag", str, "Tag request", required=True, max_len=MAX_REVISION_LEN)
    field(body, "message", str, "Tag request", max_len=MAX_MESSAGE_LEN)
    if not BRANCH_RE.match(tag) or ".." in tag or tag.startswith("refs/"):
        raise HubError(400, f"Invalid tag name {printable(repr(tag))}")
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
    body = as_object(h.json_body(), "Preupload request")
    wanted = objects(field(body, "files", list, "Preupload request", default=[], max_len=MAX_LIST_ITEMS),
                     "Preupload request: files")
    repo = ctx.write(repo_type, repo_id, user)
    with ctx.store.lock:
        sha, _ = resolve(repo, rev)
        files = repo.commits[sha]["files"]
    patterns = lfs_patterns(ctx, files)
    out = []
    for f in wanted:
        path = clean_path(f.get("path"))
        size = size_field(f, "size", f"Preupload of {path}", required=False) or 0
        try:
            sample = base64.b64decode(field(f, "sample", str, f"Preupload of {path}", default="", max_len=4096))
        except ValueError:
            raise HubError(400, f"Invalid base64 sample for {path}") from None
        name = path.rsplit("/", 1)[-1]
        # The Hub's rule: LFS for big files, binary-looking samples and .gitattributes LFS patterns.
        lfs = (size > LFS_SIZE_THRESHOLD or b"\x00" in sample
               or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns))
        item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
        # The only content-addressed answer here: the oid of what this repo already has at `path`.
        existing = files.get(path)
        if existing is not None:
            item["oid"] = existing["lfs"]["oid"] if existing.get("lfs") else existing["oid"]
        out.append(item)
    h.send_json({"files": out, "commitOid": sha})


def commit(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    repo = ctx.write(repo_type, repo_id, user)
    assert user is not None
    create_pr = h.query.get("create_pr", [""])[0] in ("1", "true")
    h.body.limit(MAX_COMMIT_BODY)
    header, ops = _read_commit(ctx, h, user)
    summary = field(header, "summary", str, "Commit header", default="Upload", max_len=MAX_MESSAGE_LEN)
    description = field(header, "description", str, "Commit header", default="", max_len=MAX_MESSAGE_LEN)
    parent = field(header, "parentCommit", str, "Commit header")
    pr_url = None
    with ctx.store.lock:
        if create_pr:
            base, _ = resolve(repo, rev)
            ref = None
        else:
            base, ref = resolve(repo, rev)
            if ref is None or ref.startswith("refs/tags/"):
                raise HubError(400, f"Invalid rev id: {rev} is not a branch; commit to a branch or a PR")
        if parent and parent != base:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[base]["files"])
        for key, value in ops:
            apply_op(files, key, value)
        commit = ctx.store.new_commit(repo, base, files, summary or "Upload", description, user)
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


def open_pull_request(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    """`POST /api/{type}s/{id}/discussions` with ``pullRequest: true``: an empty pull request on main's
    head, ``refs/pr/N``, to commit to (what huggingface_hub's upload pipeline does for `create_pr`, so
    a retried commit can never open a second one). Plain discussions are not kept here."""
    repo = ctx.write(repo_type, repo_id, user)
    body = as_object(h.json_body(), "Discussion")
    title = field(body, "title", str, "Discussion", max_len=MAX_MESSAGE_LEN).strip()
    if not title:
        raise HubError(400, "Discussion: a title is required")
    if body.get("pullRequest") is not True:
        raise HubError(400, "This local Hub keeps pull requests only: send pullRequest: true")
    with ctx.store.lock:
        head, _ = resolve(repo, "main")
        num = ctx.store.next_pr(repo, title, user)
        ctx.store.set_ref(repo, f"refs/pr/{num}", head)
    h.send_json({"num": num, "url": {"web": f"{h.base_url()}/{repo.url_id}/discussions/{num}"}, "pullRequest": True})


def pull_request(ctx: Context, h: Exchange, repo_type: str, repo_id: str, num: str, user: str | None) -> None:
    """`GET /api/{type}s/{id}/discussions/{num}`: a pull request's details (get_discussion_details)."""
    with ctx.store.lock:
        repo = ctx.read(repo_type, repo_id, user)
        n = int(num) if num.isascii() and num.isdigit() else -1
        ref = f"refs/pr/{n}"
        if ref not in repo.refs:
            raise HubError(404, "Discussion not found")
        meta = repo.prs.get(n) or {"title": repo.commits[repo.refs[ref]]["title"], "author": repo.owner,
                                   "date": repo.commits[repo.refs[ref]]["date"]}
    h.send_json({"num": n, "title": meta["title"], "author": {"name": meta["author"]}, "createdAt": meta["date"],
                 "status": "open", "isPullRequest": True, "repo": {"name": repo.id, "type": repo.type},
                 "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})


def _read_commit(ctx: Context, h: Exchange, user: str) -> tuple[dict, list[tuple[str, dict]]]:
    """The NDJSON payload: one header line, then one operation per line, each checked as it arrives."""
    header: dict | None = None
    ops: list[tuple[str, dict]] = []
    while True:
        line = h.body.readline(MAX_NDJSON_LINE)
        if not line:
            break
        if not line.strip():
            continue
        item = as_object(parse_json(line, "A line of the NDJSON commit payload"), "Commit payload line")
        key = field(item, "key", str, "Commit payload line", required=True)
        value = as_object(item.get("value"), f"Commit payload: {printable(key)} value")
        if key == "header":
            if header is not None:
                raise HubError(400, "Commit payload has more than one header line")
            header = value
        elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
            if len(ops) >= MAX_COMMIT_OPS:
                raise HubError(413, f"A commit holds at most {MAX_COMMIT_OPS} operations: split it")
            ops.append((key, prepare_op(ctx, key, value, user)))
        else:
            raise HubError(400, f"Unsupported commit operation {printable(repr(key))}")
    if header is None:
        raise HubError(400, "Commit payload has no header line")
    return header, ops


def prepare_op(ctx: Context, key: str, value: dict, user: str | None) -> dict:
    """Validate one operation and store regular content, before taking the repo lock.

    An LFS file may name only an object that a repo `user` can read holds: its own upload through
    this or another of its repos, or a file of a readable revision. A blob stored for someone else
    is answered exactly like a missing one.
    """
    if key == "deletedFolder":
        return {"path": clean_path(field(value, "path", str, "deletedFolder", required=True).rstrip("/"))}
    path = clean_path(value.get("path"))
    if key == "deletedFile":
        return {"path": path}
    if key == "file":
        if field(value, "encoding", str, f"File {path}", default="base64") != "base64":
            raise HubError(400, "Only base64 encoding is supported for file operations")
        try:
            data = base64.b64decode(field(value, "content", str, f"File {path}", default=""), validate=True)
        except ValueError:
            raise HubError(400, f"Invalid base64 content for {path}") from None
        return {"path": path, "entry": {"oid": ctx.store.put_regular(data), "size": len(data)}}
    oid = field(value, "oid", str, f"LFS file {path}", required=True)
    announced = size_field(value, "size", f"LFS file {path}", required=False)
    if field(value, "algo", str, f"LFS file {path}", default="sha256") != "sha256" or not SHA256_RE.match(oid):
        raise HubError(400, f"Invalid LFS oid for {path}")
    if not ctx.lfs_readable(user, oid):
        raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                            f"exist: {path} ({oid})")
    size = ctx.store.blob_path("lfs", oid).stat().st_size
    if announced is not None and announced != size:
        raise HubError(422, f"LFS object {oid} has size {size}, not {announced}")
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
