"""Read endpoints of the local Hub: repo info, tree, paths-info, refs, commits, file downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from .access import Context
from .blobs import parse_range, stream_blob
from .cas import cdn_url
from .cas import xet_token as make_token
from .common import MAX_JSON_BODY, MAX_PATHS_INFO, SHA1_RE, HubError, clean_path, iso
from .exchange import Exchange
from .schema import as_object, field, parse_json
from .storage import Repo, resolve


def snapshot(ctx: Context, repo_type: str, repo_id: str, rev: str, user: str | None) -> tuple[Repo, dict]:
    with ctx.store.lock:
        repo = ctx.read(repo_type, repo_id, user)
        sha, _ = resolve(repo, rev)
        return repo, repo.commits[sha]


def file_entry(path: str, e: dict) -> dict:
    out = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e.get("lfs"):
        out["lfs"] = dict(e["lfs"])
    return out


def dir_entry(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0,
            "path": path}


def info(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    repo, commit = snapshot(ctx, repo_type, repo_id, rev, user)
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
    out: dict[str, Any] = {
        "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
        "author": ns, "sha": commit["id"], "lastModified": commit["date"], "createdAt": iso(repo.created_at),
        "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
        "siblings": siblings, "usedStorage": sum(e["size"] for e in commit["files"].values()),
    }
    if repo_type == "model":
        out.update(modelId=repo_id, library_name=None)
    h.send_json(out)


def tree(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, path: str, user: str | None) -> None:
    """One page of a folder's entries (folders first); a ``Link: rel="next"`` header points to the next."""
    _, commit = snapshot(ctx, repo_type, repo_id, rev, user)
    path = clean_path(path.strip("/"), allow_empty=True)
    recursive = h.query.get("recursive", [""])[0].lower() in ("1", "true")
    cursor_text = h.query.get("cursor", ["0"])[0]
    if not (cursor_text.isascii() and cursor_text.isdigit() and len(cursor_text) < 10):
        raise HubError(400, "Invalid tree cursor: follow the Link header of the previous page")
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
            out.append(file_entry(p, e))
    if path and not out and not dirs:
        raise HubError(404, f"{path} does not exist at this revision", "EntryNotFound")
    entries = [dir_entry(d) for d in sorted(dirs)] + out
    start, page = int(cursor_text), ctx.limits.tree_page
    headers = {}
    if start + page < len(entries):
        query = urlencode([(k, v) for k, vs in h.query.items() if k != "cursor" for v in vs]
                          + [("cursor", str(start + page))])
        url = f"{h.base_url()}/api/{repo_type}s/{repo_id}/tree/{quote(rev, safe='')}/{quote(path)}"
        headers["Link"] = f'<{url.rstrip("/")}?{query}>; rel="next"'
    h.send_json(entries[start:start + page], headers=headers)


def paths_info(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    raw = h.body.read_all(MAX_JSON_BODY)
    if (h.headers.get("Content-Type") or "").startswith("application/json"):
        body = as_object(parse_json(raw or b"{}", "Request body"), "Paths-info request")
        paths = field(body, "paths", list, "Paths-info request", default=[], max_len=MAX_PATHS_INFO)
    else:
        paths = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).get("paths", [])
        if len(paths) > MAX_PATHS_INFO:
            raise HubError(413, f"Paths-info request: at most {MAX_PATHS_INFO} paths")
    _, commit = snapshot(ctx, repo_type, repo_id, rev, user)
    files, out = commit["files"], []
    folders = {f.rsplit("/", i)[0] for f in files for i in range(1, f.count("/") + 1)}
    for p in paths:
        if not isinstance(p, str):
            raise HubError(400, "Paths-info request: every path must be a string")
        p = clean_path(p.strip("/"))
        if p in files:
            out.append(file_entry(p, files[p]))
        elif p in folders:
            out.append(dir_entry(p))
    h.send_json(out)


def refs(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    with ctx.store.lock:
        repo = ctx.read(repo_type, repo_id, user)
        all_refs = sorted(repo.refs.items())

    def items(prefix: str) -> list[dict]:
        return [{"name": r[len(prefix):], "ref": r, "targetCommit": t} for r, t in all_refs if r.startswith(prefix)]

    out: dict[str, Any] = {"branches": items("refs/heads/"), "tags": items("refs/tags/"), "converts": []}
    if h.query.get("include_prs", [""])[0] in ("1", "true"):
        out["pullRequests"] = [{"name": r, "ref": r, "targetCommit": t} for r, t in all_refs
                               if r.startswith("refs/pr/")]
    h.send_json(out)


def commits(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, user: str | None) -> None:
    repo, commit = snapshot(ctx, repo_type, repo_id, rev, user)
    out: list[dict] = []
    while commit is not None:
        out.append({"id": commit["id"], "title": commit["title"], "message": commit["message"],
                    "date": commit["date"], "authors": [{"user": commit["author"], "avatar": None}]})
        parents = commit["parents"]
        commit = repo.commits.get(parents[0]) if parents else None
    h.send_json(out)


def resolve_file(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, path: str,
                 user: str | None, cached: bool = False) -> None:
    """`HEAD`/`GET /{id}/resolve/{rev}/{path}`: the file's bytes (or a Range of them) and the Hub's headers.

    `cached`: the ``/api/resolve-cache/{type}s/{id}/{commit}/{path}`` form, where a regular file's
    resolve redirects (`Features.resolve_cache`): `rev` must be a commit of this repo (the Hub
    answers 400 to a branch name there, 404 to another repo's commit).
    """
    path = clean_path(path)
    if cached and not SHA1_RE.match(rev):
        raise HubError(400, "Invalid revision: resolve-cache URLs name a commit")
    repo, commit = snapshot(ctx, repo_type, repo_id, rev, user)
    if cached and commit["id"] != rev:
        raise HubError(404, "Revision not found", "RevisionNotFound")
    # Before anything about the file: without access even a HEAD (size, ETag) is refused, like the Hub.
    ctx.download(repo, user, h.base_url())
    entry = commit["files"].get(path)
    if entry is None:
        raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
    lfs = entry.get("lfs")
    blob = ctx.store.blob_path("lfs", lfs["oid"]) if lfs else ctx.store.blob_path("git", entry["oid"])
    size = entry["size"]
    etag = lfs["oid"] if lfs else entry["oid"]
    headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
               "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
    if lfs:
        headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
    if lfs and (ctx.features.cdn or ctx.features.xet):
        return _redirect_to_storage(ctx, h, repo_type, repo_id, commit["id"], lfs["oid"], blob, headers)
    if not lfs and not cached and ctx.features.resolve_cache:
        return _redirect_to_cache(h, repo_type, repo_id, rev, commit["id"], path, etag, headers)
    start, end, status = 0, size - 1, 200
    rng = h.headers.get("Range")
    if rng and h.command == "GET":
        try:
            parsed = parse_range(rng, size)
        except HubError as err:
            err.headers = {**headers, **err.headers}
            raise
        if parsed is not None:
            (start, end), status = parsed, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = max(0, end - start + 1)
    h.send_head(status, length, headers, content_type="application/octet-stream")
    if h.command != "HEAD":
        stream_blob(h, blob, start, length, path)


def _redirect_to_storage(ctx: Context, h: Exchange, repo_type: str, repo_id: str, commit: str, sha256: str,
                         blob: Path, headers: dict) -> None:
    """An LFS file as the Hub answers it: a 302 to a signed URL of the storage side (the client must not
    send its token there) and, for Xet-backed files, the Xet hash and where to get a CAS token."""
    headers = {**headers, "Location": cdn_url(ctx, sha256)}
    if ctx.features.xet:
        file_hash = ctx.store.xet.ensure(sha256, blob)
        token_url = f"{h.base_url()}/api/{repo_type}s/{repo_id}/xet-read-token/{commit}"
        headers.update({"X-Xet-Hash": file_hash, "Link": f'<{token_url}>; rel="xet-auth"'})
    h.send_bytes(302, b"", headers, content_type="text/plain")


def _redirect_to_cache(h: Exchange, repo_type: str, repo_id: str, rev: str, commit: str, path: str, etag: str,
                       headers: dict) -> None:
    """A regular file as huggingface.co answers it: a 307 to a *relative* resolve-cache URL pinned to the
    commit, whose query names the original path and the ETag (``/api/resolve-cache/models/{id}/{sha}/
    {path}?%2F{id}%2Fresolve%2F{rev}%2F{path}=&etag=%22{etag}%22``)."""
    prefix = "" if repo_type == "model" else f"/{repo_type}s"
    original = f"{prefix}/{repo_id}/resolve/{rev}/{path}"
    location = (f"/api/resolve-cache/{repo_type}s/{repo_id}/{commit}/{quote(path)}"
                f"?{quote(original, safe='')}=&etag={quote(chr(34) + etag + chr(34), safe='')}")
    keep = {k: v for k, v in headers.items() if k in ("X-Repo-Commit", "ETag")}
    h.send_bytes(307, f"Temporary Redirect. Redirecting to {location}".encode(), {**keep, "Location": location},
                 content_type="text/plain; charset=utf-8")


def xet_token(ctx: Context, h: Exchange, repo_type: str, repo_id: str, rev: str, write: bool,
              user: str | None) -> None:
    """`GET /api/{type}s/{id}/xet-{read,write}-token/{rev}`: a CAS token for this repo (hub-docs docs/xet/auth.md)."""
    if write:
        ctx.write(repo_type, repo_id, user)
    else:
        repo, _ = snapshot(ctx, repo_type, repo_id, rev, user)
        ctx.download(repo, user, h.base_url())
    token, exp = make_token(ctx, repo_type, repo_id, "write" if write else "read")
    cas = ctx.features.storage_url
    h.send_json({"accessToken": token, "exp": exp, "casUrl": cas},
                headers={"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)})


def safetensors_metadata(ctx: Context, h: Exchange, repo_type: str, repo_id: str, filename: str,
                         user: str | None) -> None:
    """`{index, headers}` of a sharded safetensors repo at main (get_sharded_safetensors_metadata)."""
    repo, commit = snapshot(ctx, repo_type, repo_id, "main", user)
    ctx.download(repo, user, h.base_url())  # it hands out the shards' headers: file content
    files = commit["files"]

    def read(path: str, n: int | None = None, offset: int = 0) -> bytes:
        e = files.get(path)
        if e is None:
            raise HubError(404, f"{path} not found", "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
        blob = ctx.store.blob_path("lfs", e["lfs"]["oid"]) if e.get("lfs") else \
            ctx.store.blob_path("git", e["oid"])
        with open(blob, "rb") as f:
            f.seek(offset)
            return f.read(-1 if n is None else n)

    name = clean_path(filename)
    index = as_object(parse_json(read(name), name), name)
    weight_map = index.get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HubError(400, f"{name}: weight_map must map tensor names to file names")
    headers = {}
    for shard in sorted(set(weight_map.values())):
        n = int.from_bytes(read(clean_path(shard), 8), "little")
        if n > 100 * 1024 * 1024:
            raise HubError(400, f"{shard}: safetensors header too large")
        headers[shard] = as_object(parse_json(read(shard, n, 8), f"{shard}'s header"), f"{shard}'s header")
    h.send_json({"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})
