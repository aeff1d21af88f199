"""Git-LFS basic transfer of the local Hub: batch, upload (PUT to a signed URL) and verify."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from .access import Context
from .exchange import Exchange
from .common import SHA256_RE, URL_PREFIX, HubError


def sign(ctx: Context, oid: str, size: int) -> str:
    return hmac.new(ctx.secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def batch(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    body = h.json_body()
    ctx.write(repo_type, repo_id, user)
    if body.get("operation") != "upload":
        raise HubError(422, "Only the 'upload' LFS operation is supported")
    base, objects = h.base_url(), []
    for obj in body.get("objects") or []:
        oid, size = str(obj.get("oid")), obj.get("size")
        if not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "Invalid oid or size"}})
            continue
        item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if not ctx.store.has_lfs(oid, size):
            item["actions"] = {
                "upload": {"href": f"{base}/_lfs/{oid}?size={size}&sig={sign(ctx, oid, size)}"},
                "verify": {"href": f"{base}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"},
            }
        objects.append(item)
    h.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                content_type="application/vnd.git-lfs+json")


def put(ctx: Context, h: Exchange, oid: str) -> None:
    try:
        size = int(h.query.get("size", ["-1"])[0])
    except ValueError:
        size = -1
    sig = h.query.get("sig", [""])[0]
    if size < 0 or not SHA256_RE.match(oid) or not hmac.compare_digest(sig, sign(ctx, oid, size)):
        raise HubError(403, "Invalid or expired upload URL")
    if ctx.store.has_lfs(oid, size):
        h.body.drain()
    else:
        ctx.store.receive_lfs(h.body, oid, size)
    h.send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")


def verify(ctx: Context, h: Exchange, repo_type: str, repo_id: str, user: str | None) -> None:
    body = h.json_body()
    ctx.write(repo_type, repo_id, user)
    if not ctx.store.has_lfs(str(body.get("oid")), body.get("size")):
        raise HubError(404, "LFS object not found (or size mismatch)")
    h.send_json({"success": True})
