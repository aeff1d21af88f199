"""A local Hugging Face Hub-compatible HTTP server, for tests and the offline demo.

It speaks the subset of the Hub's HTTP API that ``huggingface_hub``'s download, metadata and upload
paths use (repo create/delete, info, tree, paths-info, refs, commits, branches, tags, resolve with
Range, preupload, git-LFS basic transfer, NDJSON commits, pull-request refs), with Hub-like access
control for private repos. Point the client at it with ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1``,
both set *before* ``huggingface_hub`` is first imported (it reads them once at import).

Modules, in the order a request meets them:
``server`` (LocalHub: start/stop; with ``admin``'s repo settings and ``faults``' injected faults and
request log) -> ``transport`` (threads, connection cap, HTTP handler) -> ``body`` (read deadlines,
Content-Length and chunk parsing) -> ``routes`` (path -> endpoint) -> ``reads`` / ``writes`` /
``lfs`` (endpoints) -> ``access`` (who may do what) -> ``storage`` (repos, commits, refs, blobs and
which repo holds which LFS object);
``schema`` checks JSON shapes; ``common`` holds the Hub's naming rules, limits and HubError.
A second port serves the storage side (``cas``: signed CDN URLs and the Xet CAS API over ``xet``'s
xorbs and file reconstructions), switched on with ``LocalHub.set_storage(cdn=..., xet=...)``; see
docs/hub-compatibility.md.

This package is deliberately stdlib-only and must never import ``huggingface_hub``: tests start the
server before the client is first imported.
"""

from .common import Limits, git_blob_sha1, parse_token_spec
from .faults import Fault, RateLimit, RequestRecord
from .server import LocalHub, is_loopback

__all__ = ["LocalHub", "Limits", "Fault", "RateLimit", "RequestRecord", "parse_token_spec", "git_blob_sha1", "is_loopback"]
