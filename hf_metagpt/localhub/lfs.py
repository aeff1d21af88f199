"""Git-LFS basic transfer of the local Hub: batch, upload (PUT to a signed URL) and verify.

Blobs are stored once, by sha256, but belong to repos: an object counts as present for a caller
only if a repo they can read holds it (`Store.lfs_readable`). Batch and verify answer with that
rule, so neither tells whether someone else's private file exists; an upload is always hashed,
even of a blob stored already, and then gives the repo it was signed for the object.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import quote

from .access import Context
from .common import MAX_LIST_ITEMS, SHA256_RE, URL_PREFIX, HubError
from .exchange import Exchange
from .schema import as_object, field, objects, size_field


def sign(ctx: Context, repo_key: str, oid: str, size: int) -> str:
    """The signature of an upload URL: it names the repo the upload is for, the object and its size."""
    return hmac.new(ctx.secret, f"{repo_key}\n{oid}\n{size}".encode(), hashlib.sha256).hexdigest()


def batch(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    body = as_object(h.json_body(), "LFS batch request")
    ctx.write(repo_type, repo_id, user)
    if field(body, "operation", str, "LFS batch request") != "upload":
        raise HubError(422, "Only the 'upload' LFS operation is supported")
    wanted = objects(field(body, "objects", list, "LFS batch request", default=[], max_len=MAX_LIST_ITEMS),
                     "LFS batch request: objects")
    base, key, out = h.base_url(), f"{repo_type}:{repo_id}", []
    for obj in wanted:
        oid, size = obj.get("oid"), obj.get("size")
        if not isinstance(oid, str) or not SHA256_RE.match(oid) or type(size) is not int or size < 0:
            out.append({"oid": oid if isinstance(oid, str) else "", "size": size if type(size) is int else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"}})
            continue
        item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if not ctx.lfs_readable(user, oid, size):
            item["actions"] = {
                "upload": {"href": f"{base}/_lfs/{oid}?size={size}&repo={quote(key, safe='')}"
                                   f"&sig={sign(ctx, key, oid, size)}"},
                "verify": {"href": f"{base}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"},
            }
        out.append(item)
    h.send_json({"transfer": "basic", "objects": out, "hash_algo": "sha256"},
                content_type="application/vnd.git-lfs+json")


def put(ctx: Context, h: Exchange, oid: str) -> None:
    """Receive an upload at a signed URL (no credentials, like a bucket); the bytes must hash to `oid`."""
    size_text = h.query.get("size", [""])[0]
    size = int(size_text) if size_text.isascii() and size_text.isdigit() and len(size_text) < 19 else -1
    key, sig = h.query.get("repo", [""])[0], h.query.get("sig", [""])[0]
    if size < 0 or not SHA256_RE.match(oid) or not hmac.compare_digest(
            sig.encode(), sign(ctx, key, oid, size).encode()):
        raise HubError(403, "Invalid or expired upload URL")
    repo_type, _, repo_id = key.partition(":")
    with ctx.store.lock:
        repo = ctx.store.repos.get((repo_type, repo_id))
    if repo is None:  # deleted since the batch call
        raise HubError(404, "Repository not found", "RepoNotFound")
    declared = h.body.declared_length
    if declared is not None and declared != size:
        raise HubError(400, f"Content-Length {declared} differs from the announced size {size}")
    h.body.limit(size)
    ctx.store.receive_lfs(h.body, oid, size)
    ctx.store.grant_lfs(repo, oid)
    h.send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")


def verify(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    body = as_object(h.json_body(), "LFS verify request")
    ctx.write(repo_type, repo_id, user)
    oid = field(body, "oid", str, "LFS verify request", required=True)
    size = size_field(body, "size", "LFS verify request", required=False)
    if not SHA256_RE.match(oid) or not ctx.lfs_readable(user, oid, size):
        raise HubError(404, "LFS object not found (or size mismatch)")
    h.send_json({"success": True})
