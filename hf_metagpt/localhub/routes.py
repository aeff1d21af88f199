"""Routing of the local Hub: one URL path and method -> one endpoint function.

Revisions arrive URL-quoted (``refs%2Fpr%2F1``): the raw path is split first, then each segment is
unquoted, so a quoted slash never creates a segment of its own.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlencode

from . import lfs, reads, writes
from .access import Context
from .common import REPO_TYPES, HubError, check_revision, repo_id_of
from .exchange import Exchange
from .schema import as_object


def route(ctx: Context, h: Exchange, user: str | None) -> None:
    """Answer one request (or raise `HubError`)."""
    raw_parts = h.raw_path.split("/")[1:]
    parts = [unquote(p) for p in raw_parts]
    if any(p in (".", "..") for p in parts):
        raise HubError(400, "Invalid path: '.' and '..' segments are not allowed")
    m = h.command
    if ctx.store.aliases and _redirect_alias(ctx, h, parts, raw_parts):
        return None
    if parts[:1] == ["api"]:
        return route_api(ctx, h, m, parts[1:], user)
    if parts[:1] == ["_lfs"] and len(parts) == 2 and m == "PUT":
        return lfs.put(ctx, h, parts[1])
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces") and len(parts) >= 3:
        repo_type = REPO_TYPES[parts[0]]
        parts = parts[1:]
    if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
        repo_id = repo_id_of(parts[0], parts[1][: -len(".git")])
        if parts[5:] == ["batch"] and m == "POST":
            return lfs.batch(ctx, h, repo_type, repo_id, user)
        if parts[5:] == ["verify"] and m == "POST":
            return lfs.verify(ctx, h, repo_type, repo_id, user)
    if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
        return reads.resolve_file(ctx, h, repo_type, repo_id_of(parts[0], parts[1]), check_revision(parts[3]),
                                  "/".join(parts[4:]), user)
    raise HubError(404, "Not Found", "EndpointNotFound")


def route_api(ctx: Context, h: Exchange, m: str, parts: list[str], user: str | None) -> None:
    if parts == ["whoami-v2"] and m == "GET":
        return writes.whoami(ctx, h, user)
    if parts == ["validate-yaml"] and m == "POST":
        as_object(h.json_body(), "YAML validation request")
        return h.send_json({"errors": [], "warnings": []})
    if parts == ["repos", "create"] and m == "POST":
        return writes.create_repo(ctx, h, user)
    if parts == ["repos", "delete"] and m == "DELETE":
        return writes.delete_repo(ctx, h, user)
    if parts[:1] == ["resolve-cache"] and len(parts) >= 6 and parts[1] in REPO_TYPES and m in ("GET", "HEAD"):
        return reads.resolve_file(ctx, h, REPO_TYPES[parts[1]], repo_id_of(parts[2], parts[3]), parts[4],
                                  "/".join(parts[5:]), user, cached=True)
    if len(parts) == 2 and parts[0] in REPO_TYPES:
        raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
    if len(parts) >= 3 and parts[0] in REPO_TYPES:
        repo_type, repo_id = REPO_TYPES[parts[0]], repo_id_of(parts[1], parts[2])
        op, rest = (parts[3] if len(parts) > 3 else ""), parts[4:]
        return _repo_api(ctx, h, m, repo_type, repo_id, op, rest, user)
    raise HubError(404, "Not Found", "EndpointNotFound")


def _repo_api(ctx: Context, h: Exchange, m: str, repo_type: str, repo_id: str, op: str, rest: list[str],
              user: str | None) -> None:
    rev = "/".join(rest) if rest else "main"
    if rest and op in ("revision", "paths-info", "commits", "tag", "preupload", "commit", "xet-read-token",
                       "xet-write-token"):
        check_revision(rev)  # before any use: it may reach an error message
    if op == "" and m == "GET":
        return reads.info(ctx, h, repo_type, repo_id, "main", user)
    if op == "revision" and rest and m == "GET":
        return reads.info(ctx, h, repo_type, repo_id, rev, user)
    if op == "tree" and m == "GET":
        return reads.tree(ctx, h, repo_type, repo_id, check_revision(rest[0]) if rest else "main",
                          "/".join(rest[1:]), user)
    if op == "paths-info" and rest and m == "POST":
        return reads.paths_info(ctx, h, repo_type, repo_id, rev, user)
    if op == "refs" and not rest and m == "GET":
        return reads.refs(ctx, h, repo_type, repo_id, user)
    if op == "commits" and m == "GET":
        return reads.commits(ctx, h, repo_type, repo_id, rev, user)
    if op == "branch" and rest and m in ("POST", "DELETE"):
        return writes.branch(ctx, h, repo_type, repo_id, rev, user)
    if op == "tag" and rest and m in ("POST", "DELETE"):
        return writes.tag(ctx, h, repo_type, repo_id, rev, user)
    if op == "preupload" and rest and m == "POST":
        return writes.preupload(ctx, h, repo_type, repo_id, rev, user)
    if op == "commit" and rest and m == "POST":
        return writes.commit(ctx, h, repo_type, repo_id, rev, user)
    if op == "discussions" and not rest and m == "POST":
        return writes.open_pull_request(ctx, h, repo_type, repo_id, user)
    if op == "discussions" and len(rest) == 1 and m == "GET":
        return writes.pull_request(ctx, h, repo_type, repo_id, rest[0], user)
    if op == "settings" and not rest and m == "PUT":
        return writes.settings(ctx, h, repo_type, repo_id, user)
    if op in ("xet-read-token", "xet-write-token") and rest and m == "GET":
        return reads.xet_token(ctx, h, repo_type, repo_id, rev, op == "xet-write-token", user)
    if op == "safetensors-metadata" and rest and m == "GET":
        return reads.safetensors_metadata(ctx, h, repo_type, repo_id, "/".join(rest), user)
    raise HubError(404, "Not Found", "EndpointNotFound")


def _redirect_alias(ctx: Context, h: Exchange, parts: list[str], raw_parts: list[str]) -> bool:
    """A renamed repo or a canonical ID without namespace (`gpt2`): answer a 307 to its current URL, like the Hub.

    The Location is relative and keeps the rest of the path and the query; an existing repo of the
    same name wins over an alias.
    """
    if parts[:1] == ["api"]:
        if len(parts) < 3 or parts[1] not in REPO_TYPES:
            return False
        repo_type, at, prefix = REPO_TYPES[parts[1]], 2, "/api/" + raw_parts[1]
    else:
        repo_type, at, prefix = "model", 0, ""
        if parts and parts[0] in ("datasets", "spaces") and len(parts) >= 3:
            repo_type, at, prefix = REPO_TYPES[parts[0]], 1, "/" + raw_parts[0]
    aliases, repos = ctx.store.aliases, ctx.store.repos
    for width in (2, 1):
        key = "/".join(parts[at:at + width])
        if len(parts) < at + width or (repo_type, key) in repos or (repo_type, key) not in aliases:
            continue
        if parts[0] != "api" and parts[at + width:at + width + 1] != ["resolve"]:
            continue  # file URLs: /{id}/resolve/{rev}/{path}
        rest = "/".join(raw_parts[at + width:])
        location = f"{prefix}/{quote(aliases[(repo_type, key)])}" + (f"/{rest}" if rest else "")
        query = urlencode(h.query, doseq=True)
        h.send_json({"error": "Repository moved", "url": location}, 307,
                    headers={"Location": location + (f"?{query}" if query else "")})
        return True
    return False
