"""The local Hub under attack and load (issue [local-hub-security]); all traffic to 127.0.0.1 only.

Each test is one attack that worked on the server before this issue: reading another user's private
blob by its hash, response splitting through an id or revision, malformed requests answered 500 (or
never answered), connections held forever, bursts stalled by a listen backlog of 5.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.utils import http_backoff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_metagpt.localhub import Limits, LocalHub, is_loopback
from hf_metagpt.localhub import writes as hub_writes

TOKEN = "hf_security_token"


# ---- helpers


def _host(endpoint: str) -> str:
    return endpoint.split("//", 1)[1]


def _raw(endpoint: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection(_host(endpoint), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _wire(endpoint: str, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    host, port = _host(endpoint).split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except TimeoutError:
            pass
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def _ndjson(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _commit_lfs(endpoint: str, token: str, repo: str, path: str, oid: str, size: int) -> int:
    body = _ndjson({"key": "header", "value": {"summary": "by hash"}},
                   {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": size}})
    status, _, _ = _raw(endpoint, "POST", f"/api/models/{repo}/commit/main", body,
                        {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
    return status


def _batch(endpoint: str, token: str, repo: str, oid: str, size: int) -> dict:
    payload = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}],
               "hash_algo": "sha256"}
    status, _, body = _raw(endpoint, "POST", f"/{repo}.git/info/lfs/objects/batch", json.dumps(payload).encode(),
                           {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert status == 200, body
    return json.loads(body)["objects"][0]


def _verify(endpoint: str, token: str, repo: str, oid: str, size: int) -> int:
    status, _, _ = _raw(endpoint, "POST", f"/{repo}.git/info/lfs/objects/verify",
                        json.dumps({"oid": oid, "size": size}).encode(),
                        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return status


@pytest.fixture
def alice_bob(hub_new_user, request):
    """Two fresh users, each with a client, and a name prefix unique to the test."""
    tag = hashlib.sha1(request.node.name.encode()).hexdigest()[:8]
    alice, bob = hub_new_user(f"alice-{tag}"), hub_new_user(f"bob-{tag}")
    return (HfApi(token=alice[0]), alice), (HfApi(token=bob[0]), bob)


# ---- 1. blobs belong to repos


def test_a_private_blob_cannot_be_read_through_another_repo_by_its_hash(alice_bob, hub_endpoint, tmp_path):
    (_, (alice_token, alice)), (bob_api, (_, bob)) = alice_bob
    secret = random.Random(18).randbytes(300_000)
    oid = hashlib.sha256(secret).hexdigest()
    bob_api.create_repo(f"{bob}/vault", private=True)
    bob_api.upload_file(path_or_fileobj=secret, path_in_repo="weights.bin", repo_id=f"{bob}/vault")
    HfApi(token=alice_token).create_repo(f"{alice}/public")

    # the old server accepted this commit (200) and served Bob's 300,000 bytes to anyone
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/public", "stolen.bin", oid, len(secret)) == 422
    assert HfApi(token=alice_token).list_repo_files(f"{alice}/public") == [".gitattributes"]
    status, _, _ = _raw(hub_endpoint, "GET", f"/{alice}/public/resolve/main/stolen.bin")
    assert status == 404
    # ... and a hash nobody stored is answered exactly the same way: no existence oracle
    other = hashlib.sha256(b"never uploaded").hexdigest()
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/public", "x.bin", other, 14) == 422


def test_lfs_batch_and_verify_answer_only_for_objects_the_caller_can_read(alice_bob, hub_endpoint):
    (_, (alice_token, alice)), (bob_api, (bob_token, bob)) = alice_bob
    secret = random.Random(19).randbytes(4096)
    oid = hashlib.sha256(secret).hexdigest()
    bob_api.create_repo(f"{bob}/vault", private=True)
    bob_api.upload_file(path_or_fileobj=secret, path_in_repo="w.bin", repo_id=f"{bob}/vault")
    HfApi(token=alice_token).create_repo(f"{alice}/mine")

    # for Bob the object exists (no upload action); for Alice it does not, as if never stored
    assert "actions" not in _batch(hub_endpoint, bob_token, f"{bob}/vault", oid, len(secret))
    item = _batch(hub_endpoint, alice_token, f"{alice}/mine", oid, len(secret))
    assert set(item["actions"]) == {"upload", "verify"}
    assert _verify(hub_endpoint, bob_token, f"{bob}/vault", oid, len(secret)) == 200
    assert _verify(hub_endpoint, alice_token, f"{alice}/mine", oid, len(secret)) == 404

    # the upload URL for a blob stored already still checks the bytes: wrong ones are refused ...
    href = item["actions"]["upload"]["href"]
    put = href.split(_host(hub_endpoint), 1)[1]
    status, _, _ = _raw(hub_endpoint, "PUT", put, secret[::-1])
    assert status == 400
    assert _verify(hub_endpoint, alice_token, f"{alice}/mine", oid, len(secret)) == 404
    # ... and the right ones prove Alice has them: then the object is hers to commit
    status, _, _ = _raw(hub_endpoint, "PUT", put, secret)
    assert status == 200
    assert _verify(hub_endpoint, alice_token, f"{alice}/mine", oid, len(secret)) == 200
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/mine", "w.bin", oid, len(secret)) == 200
    assert open(hf_hub_download(f"{alice}/mine", "w.bin", token=alice_token), "rb").read() == secret


def test_a_readable_blob_may_be_reused_until_its_repo_turns_private_or_is_deleted(alice_bob, hub_endpoint):
    (alice_api, (alice_token, alice)), (bob_api, (bob_token, bob)) = alice_bob
    data = [random.Random(i).randbytes(2048) for i in (20, 21)]
    oids = [hashlib.sha256(d).hexdigest() for d in data]
    bob_api.create_repo(f"{bob}/shared")
    for i, d in enumerate(data):
        bob_api.upload_file(path_or_fileobj=d, path_in_repo=f"w{i}.bin", repo_id=f"{bob}/shared")
    alice_api.create_repo(f"{alice}/mine")

    # public: the blob is reachable from a revision Alice can read, so a commit by hash is fine
    assert "actions" not in _batch(hub_endpoint, alice_token, f"{alice}/mine", oids[0], 2048)
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/mine", "copy.bin", oids[0], 2048) == 200
    # turned private: the other blob is no longer Alice's to name (the one she committed stays hers)
    bob_api.update_repo_settings(f"{bob}/shared", private=True)
    assert set(_batch(hub_endpoint, alice_token, f"{alice}/mine", oids[1], 2048)["actions"]) == {"upload", "verify"}
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/mine", "late.bin", oids[1], 2048) == 422
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/mine", "again.bin", oids[0], 2048) == 200
    # public again, then deleted: deletion gives access to nothing
    bob_api.update_repo_settings(f"{bob}/shared", private=False)
    assert _batch(hub_endpoint, alice_token, f"{alice}/mine", oids[1], 2048).get("actions") is None
    bob_api.delete_repo(f"{bob}/shared")
    assert _commit_lfs(hub_endpoint, alice_token, f"{alice}/mine", "late.bin", oids[1], 2048) == 422
    bob_api.create_repo(f"{bob}/shared")  # a new repo of the same name holds nothing of the old one
    assert "actions" in _batch(hub_endpoint, bob_token, f"{bob}/shared", oids[1], 2048)


def test_an_uploaded_but_uncommitted_object_stays_its_repos_after_a_restart(tmp_path):
    content = random.Random(22).randbytes(5000)
    oid = hashlib.sha256(content).hexdigest()
    with LocalHub(tmp_path / "data", tokens={TOKEN: "carol"}) as hub:
        HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo("carol/r")
        href = _batch(hub.endpoint, TOKEN, "carol/r", oid, len(content))["actions"]["upload"]["href"]
        assert _raw(hub.endpoint, "PUT", href.split(_host(hub.endpoint), 1)[1], content)[0] == 200
    with LocalHub(tmp_path / "data", tokens={TOKEN: "carol"}) as hub:
        assert _verify(hub.endpoint, TOKEN, "carol/r", oid, len(content)) == 200
        assert _commit_lfs(hub.endpoint, TOKEN, "carol/r", "w.bin", oid, len(content)) == 200


# ---- 2. nothing user-supplied reaches a header or a log line raw


@pytest.mark.parametrize("path", [
    "/api/models/alice/x%0d%0aSet-Cookie:%20pwn=1%0d%0aX-Injected:%20yes/tree/main",
    "/api/models/{repo}/revision/main%0d%0aSet-Cookie:%20pwn=1%0d%0aX-Injected:%20yes",
    "/api/models/{repo}/tree/main%0d%0aSet-Cookie:%20pwn=1%0d%0aX-Injected:%20yes",
    "/{repo}/resolve/main%0d%0aSet-Cookie:%20pwn=1%0d%0aX-Injected:%20yes/a.txt",
    "/{repo}/resolve/main/a%0d%0aSet-Cookie:%20pwn=1%0d%0aX-Injected:%20yes.txt",
])
def test_crlf_in_an_id_revision_or_path_never_splits_the_response(path, hub_endpoint, hub_user, hub_token):
    HfApi().create_repo(f"{hub_user}/crlf", exist_ok=True)
    status, headers, body = _raw(hub_endpoint, "GET", path.format(repo=f"{hub_user}/crlf"),
                                 headers={"Authorization": f"Bearer {hub_token}"})
    assert status == 400
    assert headers.get("Set-Cookie") is None and headers.get("X-Injected") is None
    assert "\\r\\n" in headers["X-Error-Message"]  # shown escaped, so the user still sees what was wrong
    assert "error" in json.loads(body)


# ---- 3. 4xx for every malformed request, never 500 (and never a hang)


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999999\r\n\r\n", 413),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400),
])
def test_bad_body_framing_is_refused_with_4xx_at_once(request_bytes, status, hub_endpoint):
    start = time.monotonic()
    answer = _wire(hub_endpoint, request_bytes, timeout=5)
    assert _status(answer) == status, answer[:300]
    assert b'"error"' in answer
    assert time.monotonic() - start < 3  # a huge Content-Length is refused, not waited for


def test_a_well_framed_chunked_body_is_still_read(hub_endpoint):
    answer = _wire(hub_endpoint, b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"1;ext=1\r\n{\r\n1\r\n}\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert _status(answer) == 200 and answer.endswith(b'{"errors": [], "warnings": []}')


_SHAPES = [  # (method, path under /api/models/{repo} or absolute, body, content type)
    ("POST", "/commit/main", _ndjson({"key": "header", "value": []}), "application/x-ndjson"),
    ("POST", "/commit/main", b"[]\n", "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": "header", "value": {"summary": {"a": 1}}}), "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": "header", "value": {"parentCommit": ["x"]}}), "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": "header", "value": {}}, {"key": "header", "value": {}}),
     "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": "header", "value": {}}, {"key": "file", "value": {"path": "a",
                                      "content": 5}}), "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": "header", "value": {}}, {"key": "lfsFile", "value": {
        "path": "a.bin", "oid": "0" * 64, "size": "12"}}), "application/x-ndjson"),
    ("POST", "/commit/main", _ndjson({"key": 7, "value": {}}), "application/x-ndjson"),
    ("POST", "/paths-info/main", b"[]", "application/json"),
    ("POST", "/paths-info/main", b'{"paths": "abc"}', "application/json"),
    ("POST", "/paths-info/main", b'{"paths": [1, 2]}', "application/json"),
    ("POST", "/preupload/main", b'{"files": "abc"}', "application/json"),
    ("POST", "/preupload/main", b'{"files": [{"path": "a", "size": "big"}]}', "application/json"),
    ("POST", "/preupload/main", b'{"files": [7]}', "application/json"),
    ("PUT", "/settings", b"[]", "application/json"),
    ("PUT", "/settings", b'{"private": "yes"}', "application/json"),
    ("POST", "/branch/dev", b"[]", "application/json"),
    ("POST", "/branch/dev", b'{"startingPoint": ["main"]}', "application/json"),
    ("POST", "/tag/main", b"[]", "application/json"),
    ("POST", "/tag/main", b'{"tag": 5}', "application/json"),
    ("POST", "{lfs}/batch", b"[]", "application/json"),
    ("POST", "{lfs}/batch", b'{"operation": "upload", "objects": "abc"}', "application/json"),
    ("POST", "{lfs}/batch", b'{"operation": "upload", "objects": [1, 2]}', "application/json"),
    ("POST", "{lfs}/verify", b"[]", "application/json"),
    ("POST", "{lfs}/verify", b'{"oid": 5, "size": 1}', "application/json"),
    ("POST", "/api/repos/create", b"[]", "application/json"),
    ("POST", "/api/repos/create", b'{"name": "x", "organization": ["testorg"]}', "application/json"),
    ("POST", "/api/repos/create", b'{"name": {"a": 1}}', "application/json"),
    ("POST", "/api/repos/create", b'{"name": "x", "private": "no"}', "application/json"),
    ("DELETE", "/api/repos/delete", b"[]", "application/json"),
    ("POST", "/api/validate-yaml", b"[]", "application/json"),
]


@pytest.mark.parametrize("method, path, body, content_type", _SHAPES)
def test_malformed_json_shapes_get_400_and_change_nothing(method, path, body, content_type, hub_endpoint,
                                                          hub_user, hub_token, local_hub):
    repo = f"{hub_user}/shapes"
    HfApi().create_repo(repo, exist_ok=True)
    if path.startswith("{lfs}"):
        path = f"/{repo}.git/info/lfs/objects" + path[len("{lfs}"):]
    elif not path.startswith("/api/"):
        path = f"/api/models/{repo}{path}"
    before = _state(local_hub)
    status, headers, answer = _raw(hub_endpoint, method, path, body,
                                   {"Authorization": f"Bearer {hub_token}", "Content-Type": content_type})
    assert 400 <= status < 500, (status, answer)
    assert json.loads(answer)["error"] == headers["X-Error-Message"]
    assert _state(local_hub) == before


def _state(hub: LocalHub) -> dict:
    store = hub.context.store
    with store.lock:
        return {key: (dict(r.refs), len(r.commits), r.private) for key, r in store.repos.items()}


def test_lists_and_commits_over_their_limits_are_refused(hub_endpoint, hub_user, hub_token, monkeypatch):
    repo = f"{hub_user}/limits"
    HfApi().create_repo(repo, exist_ok=True)
    auth = {"Authorization": f"Bearer {hub_token}", "Content-Type": "application/json"}
    monkeypatch.setattr(hub_writes, "MAX_LIST_ITEMS", 3)
    monkeypatch.setattr(hub_writes, "MAX_COMMIT_OPS", 3)
    files = [{"path": f"f{i}.txt", "size": 1, "sample": ""} for i in range(4)]
    status, _, body = _raw(hub_endpoint, "POST", f"/api/models/{repo}/preupload/main",
                           json.dumps({"files": files}).encode(), auth)
    assert (status, json.loads(body)["error"]) == (413, "Preupload request: 'files' is too long (at most 3)")
    ops = [{"key": "file", "value": {"path": f"f{i}.txt", "content": "eA==", "encoding": "base64"}} for i in range(4)]
    status, _, body = _raw(hub_endpoint, "POST", f"/api/models/{repo}/commit/main",
                           _ndjson({"key": "header", "value": {"summary": "many"}}, *ops),
                           {**auth, "Content-Type": "application/x-ndjson"})
    assert (status, json.loads(body)["error"]) == (413, "A commit holds at most 3 operations: split it")
    assert HfApi().list_repo_files(repo) == [".gitattributes"]
    # a JSON body over 8 MB is refused from its Content-Length, before any byte of it is read
    answer = _wire(hub_endpoint, f"POST /api/models/{repo}/preupload/main HTTP/1.1\r\nHost: x\r\n"
                                 f"Authorization: Bearer {hub_token}\r\nContent-Length: {9 * 1024 * 1024}\r\n\r\n".encode())
    assert _status(answer) == 413


def test_tree_listings_come_in_pages_that_the_client_follows(tmp_path):
    with LocalHub(tmp_path / "data", tokens={TOKEN: "dave"}, limits=Limits(tree_page=2)) as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo("dave/many")
        api.create_commit("dave/many", commit_message="files", operations=[
            CommitOperationAdd(f"d/f{i}.txt", b"x") for i in range(5)])
        status, headers, body = _raw(hub.endpoint, "GET", "/api/models/dave/many/tree/main/d",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and [e["path"] for e in json.loads(body)] == ["d/f0.txt", "d/f1.txt"]
        assert headers["Link"] == f'<{hub.endpoint}/api/models/dave/many/tree/main/d?cursor=2>; rel="next"'
        assert sorted(e.path for e in api.list_repo_tree("dave/many", path_in_repo="d")) == [
            f"d/f{i}.txt" for i in range(5)]
        assert _raw(hub.endpoint, "GET", "/api/models/dave/many/tree/main?cursor=-1",
                    headers={"Authorization": f"Bearer {TOKEN}"})[0] == 400


# ---- 4. bounded resources


def _connect(endpoint: str) -> socket.socket:
    host, port = _host(endpoint).split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _read_until_closed(s: socket.socket, limit: float) -> bytes | None:
    """What the server sent before closing the connection; None if it still held it after `limit` s."""
    s.settimeout(limit)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return out


def test_half_open_connections_are_capped_and_closed_by_the_header_timeout(tmp_path):
    limits = Limits(header_timeout=0.5, idle_timeout=0.5, max_connections=8)
    baseline = threading.active_count()
    with LocalHub(tmp_path / "data", tokens={TOKEN: "erin"}, limits=limits) as hub:
        silent = [_connect(hub.endpoint) for _ in range(20)]        # connect, never send a byte
        dripping = [_connect(hub.endpoint) for _ in range(20)]      # slowloris: headers a byte at a time
        for s in dripping:
            s.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\n")
        held = []
        for _ in range(6):
            held.append(hub.open_connections)
            for s in dripping:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
            time.sleep(0.2)
        # never more threads than the cap, whatever the number of connections
        assert max(held) <= 8 and threading.active_count() <= baseline + 8 + 2
        answers = [_read_until_closed(s, 3) for s in silent + dripping]
        # each was closed: by the idle/header timeout (nothing, or 408), or refused over the cap (503)
        assert all(a is not None and (a == b"" or _status(a) in (408, 503)) for a in answers)
        assert all(b"Retry-After: 1" in a for a in answers if _status(a) == 503)
        assert any(_status(a) == 503 for a in answers)
        for s in silent + dripping:
            s.close()
        deadline = time.monotonic() + 5
        while hub.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.open_connections == 0
        # and the server still answers
        assert _raw(hub.endpoint, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    time.sleep(0.2)
    assert threading.active_count() <= baseline  # no thread outlives its connection, or the server


def test_the_client_honours_retry_after_when_the_server_is_full(tmp_path):
    limits = Limits(idle_timeout=1.0, max_connections=2)
    with LocalHub(tmp_path / "data", tokens={TOKEN: "fay"}, limits=limits) as hub:
        hogs = [_connect(hub.endpoint) for _ in range(2)]
        time.sleep(0.2)
        start = time.monotonic()
        # http_backoff is what huggingface_hub uses for LFS batch/upload/verify, preupload and commits
        resp = http_backoff("GET", f"{hub.endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"},
                            max_retries=3, base_wait_time=0.1)
        took = time.monotonic() - start
        assert resp.status_code == 200 and resp.json()["name"] == "fay"
        assert took >= 2.0  # first answer 503 + Retry-After: 1; the client waited 1 + 1 s, as it documents
        for s in hogs:
            s.close()


def test_a_burst_of_200_clients_completes_without_timeouts(tmp_path):
    with LocalHub(tmp_path / "data", tokens={TOKEN: "gus"}) as hub:
        HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo("gus/burst")
        barrier = threading.Barrier(200)

        def client(i: int) -> list[float]:
            barrier.wait(10)
            times = []
            for _ in range(3):  # a fresh connection each time: the burst is of connects
                t = time.monotonic()
                status, _, body = _raw(hub.endpoint, "GET", "/api/models/gus/burst", timeout=15)
                assert status == 200 and json.loads(body)["id"] == "gus/burst"
                times.append(time.monotonic() - t)
            return times

        start = time.monotonic()
        with ThreadPoolExecutor(200) as pool:
            latencies = sorted(t for ts in pool.map(client, range(200)) for t in ts)
        wall = time.monotonic() - start
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99)]
    print(f"burst of 200 clients x 3 requests: {wall:.1f} s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    assert len(latencies) == 600
    # a listen backlog of 5 made SYN retries show up as 1, 3, 7 s waits
    assert latencies[-1] < 5.0


# ---- 4b. beyond loopback: a warning for plain HTTP, TLS when asked


def test_only_loopback_hosts_count_as_safe_for_plain_http():
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "", "example.org")] == [False] * 4


def test_cli_hub_serve_wants_cert_and_key_together(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "hub", "serve", "--data", str(tmp_path / "d"),
                           "--cert", str(tmp_path / "c.pem")], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode != 0
    assert "--cert and --key go together." in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_https_and_a_stalled_handshake_is_cut_off(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    limits = Limits(header_timeout=0.5)
    with LocalHub(tmp_path / "data", tokens={TOKEN: "hal"}, limits=limits, tls=(cert, key)) as hub:
        assert hub.endpoint.startswith("https://127.0.0.1:")
        stalled = _connect(hub.endpoint)  # TCP only, never a ClientHello
        conn = http.client.HTTPSConnection(_host(hub.endpoint), timeout=10,
                                           context=ssl.create_default_context(cafile=str(cert)))
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["name"]) == (200, "hal")
        conn.close()
        assert _read_until_closed(stalled, 3) == b""  # closed by the server after the header timeout
        stalled.close()


# ---- 5. property-based fuzz of the routes' inputs


_nasty = st.lists(st.sampled_from(list("aZ09._-/\\%:?#@ \r\n\t\x00\x7f~é\u2028") + ["..", "refs/", "--"]),
                  max_size=12).map("".join)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_keys = st.sampled_from(["name", "organization", "type", "private", "visibility", "files", "objects", "operation",
                         "oid", "size", "path", "paths", "tag", "startingPoint", "sample", "summary", "parentCommit"])
_bodies = st.one_of(_json, st.dictionaries(_keys, _json, max_size=4))
_ROUTES = [
    ("GET", "/api/models/{ns}/{name}/revision/{rev}"), ("GET", "/api/models/{ns}/{name}/tree/{rev}/{path}"),
    ("GET", "/{ns}/{name}/resolve/{rev}/{path}"), ("POST", "/api/models/{ns}/{name}/paths-info/{rev}"),
    ("POST", "/api/models/{ns}/{name}/preupload/{rev}"), ("POST", "/api/models/{ns}/{name}/commit/{rev}"),
    ("POST", "/{ns}/{name}.git/info/lfs/objects/batch"), ("POST", "/{ns}/{name}.git/info/lfs/objects/verify"),
    ("POST", "/api/models/{ns}/{name}/branch/{rev}"), ("POST", "/api/models/{ns}/{name}/tag/{rev}"),
    ("PUT", "/api/models/{ns}/{name}/settings"), ("POST", "/api/repos/create"), ("DELETE", "/api/repos/delete"),
    ("GET", "/api/models/{ns}/{name}/commits/{rev}"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(_ROUTES), ns=st.one_of(st.just("fuzzer"), _nasty), name=st.one_of(st.just("target"), _nasty),
       rev=st.one_of(st.just("main"), _nasty), path=_nasty, body=_bodies, ndjson=st.booleans())
def test_fuzzed_ids_revisions_paths_and_bodies_never_get_500(route, ns, name, rev, path, body, ndjson,
                                                             hub_endpoint, hub_new_user, local_hub):
    token, user = hub_new_user("fuzzer")
    HfApi(token=token).create_repo(f"{user}/target", exist_ok=True)
    method, template = route
    url = template.format(ns=quote(ns, safe=""), name=quote(name, safe=""), rev=quote(rev, safe=""),
                          path=quote(path, safe="/"))
    payload = json.dumps(body).encode()
    if ndjson:  # a commit payload: the fuzzed value as a header, then as an operation
        payload = _ndjson({"key": "header", "value": body}, {"key": "lfsFile", "value": body})
    before = _state(local_hub)
    status, headers, answer = _raw(hub_endpoint, method, url, payload,
                                   {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert status < 500, (method, url, payload, answer)
    assert all(k.lower() not in ("set-cookie", "x-injected") for k in headers)
    if status >= 400:
        assert _state(local_hub) == before
        assert "\r" not in headers.get("X-Error-Message", "") and "\n" not in headers.get("X-Error-Message", "")
