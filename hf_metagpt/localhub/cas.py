"""The storage side of the local Hub, on its own port (another origin, like the Hub's CDN and CAS hosts).

- ``/cdn/lfs/<sha256>?exp=..&sig=..``: a signed download URL, where the Hub's resolve redirects LFS
  files (a CDN). Like a bucket's presigned URL it refuses any ``Authorization`` header: a client
  that forwards the Hub token off the Hub gets a 400, and the request log shows it.
- The Xet CAS API of hub-docs' docs/xet/api.md, with the short-lived tokens the Hub hands out at
  ``/api/{type}s/{id}/xet-{read,write}-token/{rev}`` (`xet_token`): ``GET /v1/reconstructions/<file>``
  (and ``/v2/``), signed xorb range fetches ``/xorbs/default/<xorb>``, ``POST /v1/xorbs/default/<xorb>``,
  ``POST /v1/shards`` and ``GET /v1/chunks/default-merkledb/<hash>`` (global dedup: nothing here).

A token names the repo it was issued for; reconstructions answer only for files one of that repo's
commits or uploads holds, and uploads give the files to that repo.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time
from urllib.parse import unquote

from .access import Context
from .common import SHA256_RE, HubError
from .exchange import Exchange
from .blobs import parse_range, stream_blob

#: lifetime of signed URLs and Xet tokens (the Hub's last about an hour)
SIGNED_TTL = 3600
MAX_SHARD_BODY = 64 * 1024 * 1024
MAX_TELEMETRY_BODY = 1024 * 1024
#: a serialized xorb: 64 MiB of chunks at most (hub-docs docs/xet/xorb.md), its footer and some slack
MAX_XORB_BODY = 65 * 1024 * 1024


def _sign(ctx: Context, text: str) -> str:
    return hmac.new(ctx.secret, text.encode(), hashlib.sha256).hexdigest()


def signed_query(ctx: Context, what: str) -> str:
    exp = int(time.time()) + SIGNED_TTL
    sig = _sign(ctx, f"{what}\n{exp}")
    return f"exp={exp}&sig={sig}"


def _check_signed(ctx: Context, h: Exchange, what: str) -> None:
    exp, sig = h.query.get("exp", [""])[0], h.query.get("sig", [""])[0]
    if not (exp.isascii() and exp.isdigit()) or int(exp) < time.time() or not hmac.compare_digest(
            sig.encode(), _sign(ctx, f"{what}\n{exp}").encode()):
        raise HubError(403, "Invalid or expired signed URL")
    if h.headers.get("Authorization") is not None:
        # What a bucket's presigned URL answers when a client adds its own credentials.
        raise HubError(400, "Only one auth mechanism allowed: the signed URL, not an Authorization header")


# ---------------------------------------------------------------- Xet tokens

def xet_token(ctx: Context, repo_type: str, repo_id: str, scope: str) -> tuple[str, int]:
    """A CAS token for one repo and scope ("read" or "write"), and its expiry (unix seconds)."""
    exp = int(time.time()) + SIGNED_TTL
    payload = base64.urlsafe_b64encode(json.dumps([repo_type, repo_id, scope, exp]).encode()).decode()
    return f"xet_{payload}.{_sign(ctx, payload)}", exp


def _token_repo(ctx: Context, h: Exchange, write: bool) -> tuple[str, str]:
    auth = h.headers.get("Authorization") or ""
    token = auth[7:] if auth[:7].lower() == "bearer " else ""
    payload, _, sig = token[4:].partition(".")
    if not token.startswith("xet_") or not hmac.compare_digest(sig.encode(), _sign(ctx, payload).encode()):
        raise HubError(401, "Invalid or missing Xet token")
    repo_type, repo_id, scope, exp = json.loads(base64.urlsafe_b64decode(payload))
    if exp < time.time():
        raise HubError(401, "Xet token expired")
    if write and scope != "write":
        raise HubError(403, "This Xet token has read scope; uploads need a write token")
    return repo_type, repo_id


# ---------------------------------------------------------------- routing

def route(ctx: Context, h: Exchange, user: str | None) -> None:
    parts = [unquote(p) for p in h.raw_path.split("/")[1:]]
    m = h.command
    if len(parts) == 3 and parts[:2] == ["cdn", "lfs"] and m in ("GET", "HEAD") and SHA256_RE.match(parts[2]):
        return cdn_lfs(ctx, h, parts[2])
    if len(parts) == 3 and parts[:2] == ["xorbs", "default"] and m == "GET" and SHA256_RE.match(parts[2]):
        return fetch_xorb(ctx, h, parts[2])
    if len(parts) == 3 and parts[0] in ("v1", "v2") and parts[1] == "reconstructions" and m == "GET":
        return reconstruction(ctx, h, parts[2], v2=parts[0] == "v2")
    if parts[:3] == ["v1", "xorbs", "default"] and len(parts) == 4 and m == "POST":
        return upload_xorb(ctx, h, parts[3])
    if parts in (["v1", "shards"], ["v2", "shards"]) and m == "POST":
        return upload_shard(ctx, h, v2=parts[0] == "v2")
    if parts == ["v1", "telemetry"] and m == "POST":
        return telemetry(ctx, h)
    if len(parts) == 4 and parts[:2] == ["v1", "chunks"] and m == "GET":
        _token_repo(ctx, h, write=False)
        raise HubError(404, "Chunk not tracked by global deduplication")
    raise HubError(404, "Not Found", "EndpointNotFound")


def telemetry(ctx: Context, h: Exchange) -> None:
    """`POST /v1/telemetry`: hf_xet's transfer summary (no names, paths or hashes), sent after each
    transfer unless HF_HUB_DISABLE_TELEMETRY (or DO_NOT_TRACK, HF_HUB_OFFLINE) is set. Taken and
    dropped, so a client without those settings meets no 404 here."""
    _token_repo(ctx, h, write=False)
    h.body.read_all(MAX_TELEMETRY_BODY)
    h.send_bytes(204, b"", {}, content_type="text/plain")


# ---------------------------------------------------------------- CDN

def cdn_url(ctx: Context, sha256: str) -> str:
    return f"{ctx.features.storage_url}/cdn/lfs/{sha256}?{signed_query(ctx, sha256)}"


def cdn_lfs(ctx: Context, h: Exchange, sha256: str) -> None:
    _check_signed(ctx, h, sha256)
    blob = ctx.store.blob_path("lfs", sha256)
    if not blob.is_file():
        raise HubError(404, "Not Found")
    _serve_range(h, blob, blob.stat().st_size, {"ETag": f'"{sha256}"'})


def _serve_range(h: Exchange, path, size: int, headers: dict, required: bool = False) -> None:
    start, end, status = 0, size - 1, 200
    rng = h.headers.get("Range")
    parsed = parse_range(rng, size) if rng and h.command == "GET" else None
    if required and parsed is None:
        raise HubError(403, "A xorb URL is signed for its byte range: send it as the Range header")
    if parsed is not None:
        (start, end), status = parsed, 206
        headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
    length = max(0, end - start + 1)
    h.send_head(status, length, {"Accept-Ranges": "bytes", **headers}, content_type="application/octet-stream")
    if h.command != "HEAD":
        stream_blob(h, path, start, length, path.name)


# ---------------------------------------------------------------- Xet downloads

def _repo_holds(ctx: Context, repo_type: str, repo_id: str, sha256: str) -> bool:
    repo = ctx.store.repos.get((repo_type, repo_id))
    return repo is not None and sha256 in repo.lfs


def reconstruction(ctx: Context, h: Exchange, file_hash: str, v2: bool) -> None:
    repo_type, repo_id = _token_repo(ctx, h, write=False)
    if not SHA256_RE.match(file_hash):
        raise HubError(400, "Invalid file hash")
    xet = ctx.store.xet
    rec = xet.file_record(file_hash)
    if rec is None or not _repo_holds(ctx, repo_type, repo_id, rec["sha256"]):
        raise HubError(404, "File not found")
    first, last = 0, None
    rng = h.headers.get("Range")
    if rng:
        parsed = parse_range(rng, rec["size"])
        if parsed is not None:
            first, last = parsed
    _, terms, offset = xet.reconstruction(file_hash, first, last)
    base = ctx.features.storage_url
    out_terms = [{"hash": x, "unpacked_length": n, "range": {"start": a, "end": b}} for x, a, b, n, _, _ in terms]
    # Per xorb, the fetch ranges are the union of its terms' chunk ranges, disjoint: a file that repeats
    # itself has terms over overlapping chunks of one xorb (chunks 0-1, then 0-2), and hf_xet serves
    # each term from the first fetch range that starts where it does (one range per term made it
    # panic: "range end out of bounds: 176128 <= 131072").
    if v2:
        xorbs = {x: [{"url": f"{base}/xorbs/default/{x}?{signed_query(ctx, x)}",
                      "ranges": [{"chunks": {"start": a, "end": b}, "bytes": {"start": s, "end": e}}]}
                     for a, b, s, e in spans] for x, spans in _fetch_spans(terms).items()}
        body = {"offset_into_first_range": offset, "terms": out_terms, "xorbs": xorbs}
    else:
        fetch = {x: [{"range": {"start": a, "end": b}, "url": f"{base}/xorbs/default/{x}?{signed_query(ctx, x)}",
                      "url_range": {"start": s, "end": e}} for a, b, s, e in spans]
                 for x, spans in _fetch_spans(terms).items()}
        body = {"offset_into_first_range": offset, "terms": out_terms, "fetch_info": fetch}
    h.send_json(body)


def _fetch_spans(terms: list) -> dict[str, list[tuple[int, int, int, int]]]:
    """{xorb: [(chunk start, chunk end, first byte, last byte)]}: the sorted union of the terms' chunk
    ranges in each xorb (overlapping or touching ranges joined), with their byte ranges."""
    spans: dict[str, list[list[int]]] = {}
    for x, a, b, _, s, e in sorted(terms, key=lambda t: (t[0], t[1])):
        merged = spans.setdefault(x, [])
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1][1], merged[-1][3] = b, e
        else:
            merged.append([a, b, s, e])
    return {x: [tuple(m) for m in ms] for x, ms in spans.items()}


def fetch_xorb(ctx: Context, h: Exchange, xorb: str) -> None:
    _check_signed(ctx, h, xorb)
    xet = ctx.store.xet
    if not xet.has_xorb(xorb):
        raise HubError(404, "Not Found")
    path = xet.xorb_path(xorb)
    _serve_range(h, path, path.stat().st_size, {}, required=True)


# ---------------------------------------------------------------- Xet uploads

def upload_xorb(ctx: Context, h: Exchange, xorb: str) -> None:
    _token_repo(ctx, h, write=True)
    # a xorb is up to 64 MiB of chunks plus its footer: far above the default cap of JSON bodies
    h.body.limit(MAX_XORB_BODY)
    body = h.body.read_all(MAX_XORB_BODY)
    inserted = ctx.store.xet.put_xorb(xorb, body)
    h.send_json({"was_inserted": inserted})


def upload_shard(ctx: Context, h: Exchange, v2: bool) -> None:
    """Register the files of a shard: each is rebuilt from its terms, checked against its sha256 and
    kept as an LFS object of the token's repo (the commit that follows names it by that sha256)."""
    repo_type, repo_id = _token_repo(ctx, h, write=True)
    h.body.limit(MAX_SHARD_BODY)
    body = h.body.read_all(MAX_SHARD_BODY)
    try:
        n = _register_shard(ctx, repo_type, repo_id, body)
    except HubError as err:
        if not v2 or err.status in (401, 403):
            raise
        # /v2/shards answers 200 and streams NDJSON events: a failure is its terminal error frame.
        frames = [{"type": "error", "message": err.message, "retryable": False}]
    else:
        if not v2:
            return h.send_json({"result": 1})
        frames = [{"type": "validating", "verified": n, "total": n}, {"type": "committing", "stage": "syncing"},
                  {"type": "result"}]
    h.send_bytes(200, b"".join(json.dumps(f).encode() + b"\n" for f in frames),
                 content_type="application/x-ndjson")


def _register_shard(ctx: Context, repo_type: str, repo_id: str, body: bytes) -> int:
    from .xet import parse_shard_files

    files = parse_shard_files(body)
    store, xet = ctx.store, ctx.store.xet
    with store.lock:
        repo = store.repos.get((repo_type, repo_id))
    if repo is None:
        raise HubError(404, "Repository not found", "RepoNotFound")
    for f in files:
        digest, parts = hashlib.sha256(), []
        for piece in xet.read_terms(f["terms"]):
            digest.update(piece)
            parts.append(piece)
        data = b"".join(parts)
        sha256 = digest.hexdigest()
        if f["sha256"] is not None and f["sha256"] != sha256:
            raise HubError(400, f"Shard: file {f['hash']} rebuilds to sha256 {sha256}, the shard says {f['sha256']}")
        store.receive_lfs(io.BytesIO(data), sha256, len(data))
        store.grant_lfs(repo, sha256)
        xet.put_file(f["hash"], sha256, len(data), [list(t) for t in f["terms"]])
    return len(files)
