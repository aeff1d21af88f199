"""The Hub as it really answers ([real-hub]): rate limits (429 + RateLimit headers), canonical IDs
without a namespace and renamed repos (307), option conflicts refused before any read, shard
downloads after an interruption, CDN redirects that must not receive the token, and Xet storage
(X-Xet-Hash, xet-auth, CAS reconstruction and upload) with the real `hf_xet` client.

Every behaviour is checked against the local Hub, whose answers follow huggingface.co's recorded
ones and hub-docs (rate limits, docs/xet/).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import hf_metagpt
from hf_metagpt.demo.tiny import build_family
from hf_metagpt.sources import hub_calls
from helpers import publish, shards as _all_shards


def shards(folder: Path) -> dict[str, bytes]:
    """The merged weights (model*.safetensors). metagpt_gram.safetensors is left out: its metadata names
    the inputs, as typed (folders here, Hub IDs there)."""
    return {k: v for k, v in _all_shards(folder).items() if k.startswith("model")}


pytestmark = pytest.mark.usefixtures("fault_backoff")


@pytest.fixture(scope="module")
def family(tiny_family_merge):
    return tiny_family_merge


def _merge(ids, out, **kw):
    return hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False, **kw)


def _header_reads(requests, repo_id: str) -> dict[str, list[int | None]]:
    """Per shard of `repo_id`: the statuses of its header Range reads (bytes=0-100000)."""
    out: dict[str, list[int | None]] = {}
    for r in requests:
        if r.method == "GET" and r.path.startswith(f"/{repo_id}/resolve/") and r.range == "bytes=0-100000":
            out.setdefault(r.path.rsplit("/", 1)[1], []).append(r.status)
    return out


# ---------------------------------------------------------------- 429 rate limits

@pytest.mark.slow
def test_rate_limit_waits_for_the_announced_reset_and_never_rereads_a_header(family, tmp_path, hub_user,
                                                                              hub_faults, caplog):
    folders, expected = family
    ids = publish(folders, hub_user, "ratelimit")
    n_shards = len(list(folders[0].glob("*.safetensors")))
    assert n_shards >= 3
    # Every read of the fine-tune's files counts; a 2 s window lets three through, then answers 429
    # with `RateLimit: "resolvers";r=0;t=N` until it resets.
    rl = hub_faults.rate_limit(rf"^/{re.escape(ids[1])}/resolve/", limit=3, window=2.0)
    hub_faults.clear_requests()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        _merge(ids, tmp_path / "out")
    took = time.monotonic() - start
    assert shards(tmp_path / "out") == expected
    assert rl.limited >= 1
    waits = [r.getMessage() for r in caplog.records if "rate-limited by the Hub" in r.getMessage()]
    assert waits and all("waiting" in w and "announced reset" in w and "RateLimit t=" in w for w in waits)
    assert took < 30
    reads = _header_reads(hub_faults.requests, ids[1])
    assert any(429 in s for s in reads.values()), reads  # the limit did hit the header reads
    assert len(reads) == n_shards
    for shard, statuses in reads.items():
        # one successful read per shard: a header read once is never read again
        # (206 from the Hub itself; over Xet, 302 to the storage side, which answers the 206)
        assert len([s for s in statuses if s != 429]) == 1, (shard, statuses)
        assert set(statuses) <= {206, 302, 429}


def test_rate_limit_429_carries_the_hub_headers(hub_faults, hub_user):
    import httpx2

    api = HfApi()
    repo = f"{hub_user}/ratelimit-headers"
    api.create_repo(repo, exist_ok=True)
    hub_faults.rate_limit(rf"^/api/models/{re.escape(repo)}$", limit=1, window=300.0)
    url = f"{api.endpoint}/api/models/{repo}"
    assert httpx2.get(url).status_code == 200
    r = httpx2.get(url)
    assert r.status_code == 429
    t = int(re.fullmatch(r'"resolvers";r=0;t=(\d+)', r.headers["RateLimit"]).group(1))
    assert 290 <= t <= 300
    assert r.headers["RateLimit-Policy"] == '"fixed window";"resolvers";q=1;w=300'


def test_rate_limit_reset_beyond_the_bound_fails_at_once_with_when_to_retry(hub_faults, hub_user, monkeypatch):
    api = HfApi()
    repo = f"{hub_user}/ratelimit-long"
    api.create_repo(repo, exist_ok=True)
    monkeypatch.setenv(hub_calls.RATE_LIMIT_WAIT_ENV, "5")
    hub_faults.rate_limit(rf"^/api/models/{re.escape(repo)}$", limit=0, window=300.0)
    start = time.monotonic()
    with pytest.raises(hub_calls.HubUnavailableError) as err:
        hub_calls.call(repo, api.model_info, repo)
    assert time.monotonic() - start < 3
    assert "rate-limited by the Hub (HTTP 429 on GET /api/models/" in err.value.message
    assert re.search(r"its limit resets in (29\d|300) s", err.value.message)
    assert "Retry in 5 min" in err.value.hint and "nothing was published" in err.value.hint


# ---------------------------------------------------------------- canonical IDs and renamed repos

def test_canonical_ids_without_namespace_and_renamed_repos_merge(family, tmp_path, hub_user, local_hub):
    from hf_metagpt.sources.refs import parse_ref

    folders, expected = family
    ids = publish(folders, hub_user, "canon")
    local_hub.add_canonical("canon-base-uncased", ids[0])          # like `bert-base-uncased`
    local_hub.rename_repo(ids[2], f"{hub_user}/canon-math-renamed")  # the old name answers 307
    assert parse_ref("canon-base-uncased").repo_id == "canon-base-uncased"
    assert parse_ref("gpt2@main").repo_id == "gpt2" and parse_ref("gpt2@main").revision == "main"
    local_hub.clear_requests()
    result = _merge(["canon-base-uncased", ids[1], ids[2]], tmp_path / "out")
    assert shards(tmp_path / "out") == expected
    redirects = [r.path for r in local_hub.requests if r.status == 307]
    assert "/api/models/canon-base-uncased" in redirects
    assert f"/api/models/{ids[2]}" in redirects
    # the pinned SHA is the current repo's head
    assert HfApi().model_info(ids[2]).sha == HfApi().model_info(f"{hub_user}/canon-math-renamed").sha


def test_a_bare_name_that_is_neither_a_folder_nor_a_repo_says_both(tmp_path, monkeypatch, hub_user):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merged-model").mkdir()
    with pytest.raises(hf_metagpt.MergeError) as err:
        hf_metagpt.merge(base="merged-modle", models=[f"{hub_user}/none"], output=str(tmp_path / "o"), device="cpu")
    assert "merged-modle: repository not found or private." in str(err.value)
    assert "No local folder 'merged-modle' exists here either; the closest is 'merged-model'." in str(err.value)


# ---------------------------------------------------------------- option conflicts, before any read

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_create_pr_with_revision_is_refused_before_any_hub_request(local_hub, hub_user, tmp_path):
    local_hub.clear_requests()
    proc = _cli("merge", f"{hub_user}/conflict-chat", "--base", f"{hub_user}/conflict-base", "--push-to",
                f"{hub_user}/conflict-out", "--create-pr", "--revision", "dev")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("error: --create-pr cannot be combined with --revision dev (create_pr=True with revision='dev'): "
            "a pull request is always opened against main.") in proc.stderr
    assert "hint: Drop --revision to open a pull request against main, or drop --create-pr" in proc.stderr
    assert local_hub.requests == []  # not one read: refused before the merge started
    with pytest.raises(hf_metagpt.MergeError, match="only applies to a push"):
        hf_metagpt.merge(base=f"{hub_user}/conflict-base", models=[f"{hub_user}/conflict-chat"],
                         output=str(tmp_path / "o"), create_pr=True)
    from hf_metagpt.publish.push import push

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(hf_metagpt.MergeError, match="always opened against main"):
        push(tmp_path / "m", f"{hub_user}/conflict-out", create_pr=True, revision="dev")
    assert local_hub.requests == []


# ---------------------------------------------------------------- interrupted shard downloads

@pytest.mark.usefixtures("http_only")  # HTTP's own resume (Range from the last 10 MiB piece): Xet has none
def test_interrupted_shard_download_resumes_within_a_call_and_restarts_after_a_failed_one(hub_user, hub_faults,
                                                                                        tmp_path):
    """What huggingface_hub 2.x really does (engine/fetch.py's comment says the same): a connection
    lost mid-file is resumed with a Range request inside the same `hf_hub_download`, from the last
    whole 10 MiB piece it wrote (DOWNLOAD_CHUNK_SIZE: a smaller file starts again from 0); a
    download that fails (an HTTP error on the resume, a kill, a stopped merge) deletes its uniquely
    named partial file, and the next call starts again from byte 0."""
    import os

    from huggingface_hub import constants, hf_hub_download

    piece = constants.DOWNLOAD_CHUNK_SIZE
    data = os.urandom(piece + piece // 4)
    repo = f"{hub_user}/resume-shard"
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    sha = api.upload_file(path_or_fileobj=data, path_in_repo="big.safetensors", repo_id=repo).oid
    path = rf"^/{re.escape(repo)}/resolve/[0-9a-f]{{40}}/big\.safetensors$"
    cut = piece + 1000
    hub_faults.inject_fault(path, drop_after=cut, times=1, method="GET")
    hub_faults.clear_requests()
    got = hub_calls.call(repo, hf_hub_download, repo, "big.safetensors", revision=sha, cache_dir=tmp_path / "c1")
    assert Path(got).read_bytes() == data
    gets = [(r.range, r.status) for r in hub_faults.requests if r.method == "GET"]
    assert gets == [(None, 200), (f"bytes={piece}-", 206)]  # resumed after the last whole piece

    hub_faults.inject_fault(path, drop_after=cut, times=1, method="GET")
    hub_faults.inject_fault(path, status=500, times=1, method="GET")
    hub_faults.clear_requests()
    got = hub_calls.call(repo, hf_hub_download, repo, "big.safetensors", revision=sha, cache_dir=tmp_path / "c2")
    assert Path(got).read_bytes() == data
    gets = [(r.range, r.status) for r in hub_faults.requests if r.method == "GET"]
    assert gets == [(None, 200), (f"bytes={piece}-", 500), (None, 200)]  # the retried call starts from 0
    assert not list((tmp_path / "c2").rglob("*.incomplete"))  # the partial file was deleted, not kept


# ---------------------------------------------------------------- CDN redirects and Xet storage

@pytest.fixture
def storage(local_hub, monkeypatch):
    """The local Hub serving LFS files as the Hub does now; the client with Xet on (as installed)."""
    import huggingface_hub.constants as hf_constants

    before = (local_hub.features.cdn, local_hub.features.xet, local_hub.features.resolve_cache)

    def use(*, cdn: bool = False, xet: bool = False, client_xet: bool = True, resolve_cache: bool = False):
        local_hub.set_storage(cdn=cdn, xet=xet, resolve_cache=resolve_cache)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", not client_xet)
        return local_hub

    yield use
    local_hub.set_storage(cdn=before[0], xet=before[1], resolve_cache=before[2])


def _storage_requests(hub, kind: str):
    return [r for r in hub.requests if r.path.startswith(kind)]


def test_lfs_files_redirect_to_a_cdn_that_never_sees_the_token(family, tmp_path, hub_user, storage, hub_faults):
    folders, expected = family
    ids = publish(folders, hub_user, "cdn")
    hub = storage(cdn=True, client_xet=False)
    hub.clear_requests()
    _merge(ids, tmp_path / "out")
    assert shards(tmp_path / "out") == expected
    redirects = [r for r in hub.requests if "/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert redirects and {r.status for r in redirects} == {302}
    cdn = _storage_requests(hub, "/cdn/lfs/")
    assert cdn and {r.status for r in cdn} <= {200, 206}
    assert not any(r.authorization for r in cdn)  # the client dropped the token off the Hub
    assert all(r.query == "" for r in cdn)  # signatures are never kept in the request log
    # A client that forwarded its token would be refused, like by a bucket's signed URL.
    import httpx2

    head = httpx2.head(f"{hub.endpoint}/{ids[0]}/resolve/main/{redirects[0].path.rsplit('/', 1)[1]}",
                       headers={"Authorization": "Bearer hf_testtoken_tester"})
    location = head.headers["Location"]
    assert location.startswith(hub.storage_url + "/cdn/lfs/")
    assert httpx2.get(location, headers={"Authorization": "Bearer hf_testtoken_tester"}).status_code == 400
    assert httpx2.get(location, headers={"Range": "bytes=0-7"}).status_code == 206


def test_xet_backed_files_download_through_the_real_hf_xet_client(tmp_path, hub_user, storage):
    # weights no earlier test downloaded: over Xet (the default) the module's family is in the caches already
    folders = _unseen_family(tmp_path / "fam", seed=2513)
    _merge([str(f) for f in folders], tmp_path / "local")
    expected = shards(tmp_path / "local")
    ids = publish(folders, hub_user, "xetdl")
    hub = storage(xet=True)
    hub.clear_requests()
    _merge(ids, tmp_path / "out")
    assert shards(tmp_path / "out") == expected
    heads = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith(".safetensors")]
    assert heads and {r.status for r in heads} == {302}
    assert [r for r in hub.requests if "/xet-read-token/" in r.path and r.status == 200]
    recon = _storage_requests(hub, "/v2/reconstructions/") + _storage_requests(hub, "/v1/reconstructions/")
    assert recon and {r.status for r in recon} == {200} and all(r.authorization for r in recon)
    xorbs = _storage_requests(hub, "/xorbs/default/")
    assert xorbs and {r.status for r in xorbs} == {206}
    assert not any(r.authorization for r in xorbs) and all(r.range for r in xorbs)
    # the safetensors header reads follow the 302 to the signed URL (without the token); the shards
    # themselves came through hf_xet only
    cdn = _storage_requests(hub, "/cdn/")
    assert all(r.range == "bytes=0-100000" and not r.authorization for r in cdn)


def test_regular_files_redirect_to_the_resolve_cache_like_the_hub(family, tmp_path, hub_user, storage):
    """huggingface.co answers a regular file's resolve with a 307 to a relative
    /api/resolve-cache/models/{id}/{commit}/{path}?{original path}=&etag=... (recorded answers); the
    client follows it for HEAD and GET, and a merge by ID reads its configs through it."""
    import httpx2

    folders, expected = family
    ids = publish(folders, hub_user, "rcache")
    hub = storage(xet=True, resolve_cache=True)
    hub.clear_requests()
    _merge(ids, tmp_path / "out")
    assert shards(tmp_path / "out") == expected
    configs = [r for r in hub.requests if "/resolve/" in r.path and r.path.endswith("/config.json")]
    assert configs and {r.status for r in configs} == {307}
    cached = [r for r in hub.requests if r.path.startswith("/api/resolve-cache/models/")]
    assert {r.method for r in cached} == {"HEAD", "GET"} and {r.status for r in cached} == {200}
    sha = HfApi().model_info(ids[0]).sha
    head = httpx2.head(f"{hub.endpoint}/{ids[0]}/resolve/main/config.json")
    quoted = f"/{ids[0]}/resolve/main/config.json".replace("/", "%2F")
    assert head.status_code == 307 and head.headers["Location"].startswith(
        f"/api/resolve-cache/models/{ids[0]}/{sha}/config.json?{quoted}=&etag=%22")
    got = httpx2.get(hub.endpoint + head.headers["Location"])
    assert got.status_code == 200 and got.content == (folders[0] / "config.json").read_bytes()
    assert got.headers["X-Repo-Commit"] == sha
    # like the Hub: a branch name there is a 400, another repo's commit a 404
    assert httpx2.get(f"{hub.endpoint}/api/resolve-cache/models/{ids[0]}/main/config.json").status_code == 400
    other = HfApi().model_info(ids[1]).sha
    assert httpx2.get(f"{hub.endpoint}/api/resolve-cache/models/{ids[0]}/{other}/config.json").status_code == 404


def test_a_file_that_repeats_itself_downloads_through_xet(tmp_path, hub_user, storage):
    """hf_xet uploads a file with repeated content as terms over overlapping chunks of one xorb (chunks
    0-1, then 0-2). The CAS must hand out each xorb's fetch ranges as their disjoint union: one range
    per term made hf_xet panic ("range end out of bounds: 176128 <= 131072") and the download fail."""
    from huggingface_hub import hf_hub_download

    hub = storage(xet=True)
    repo = f"{hub_user}/xet-repeats"
    HfApi().create_repo(repo, exist_ok=True)
    data = bytes(range(256)) * 1200 + bytes(reversed(range(256))) * 300
    HfApi().upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo)
    hub.clear_requests()
    assert Path(hf_hub_download(repo, "w.bin", cache_dir=tmp_path / "c")).read_bytes() == data
    assert [r for r in hub.requests if "/reconstructions/" in r.path and r.status == 200]


def test_xet_telemetry_is_taken_when_the_client_sends_it(tmp_path, hub_user, storage):
    """Without HF_HUB_DISABLE_TELEMETRY (the suite sets it), hf_xet POSTs a summary of each transfer to
    the CAS's /v1/telemetry: the local Hub takes it (it answered 404 before)."""
    import os

    hub = storage(xet=True)
    repo = f"{hub_user}/xet-telemetry"
    HfApi().create_repo(repo, exist_ok=True)
    data = bytes(range(256)) * 1200
    HfApi().upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    env["HF_HOME"] = str(tmp_path / "home")
    hub.clear_requests()
    code = "from huggingface_hub import hf_hub_download as d; import sys; sys.stdout.write(open(d(sys.argv[1], 'w.bin'), 'rb').read().hex())"
    proc = subprocess.run([sys.executable, "-c", code, repo], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bytes.fromhex(proc.stdout) == data
    sent = [r for r in hub.requests if r.path == "/v1/telemetry"]
    assert sent and {(r.method, r.status) for r in sent} == {("POST", 204)}


def test_xet_resolve_answers_like_the_hub(hub_user, storage):
    import httpx2

    hub = storage(xet=True)
    api = HfApi()
    repo = f"{hub_user}/xet-headers"
    api.create_repo(repo, exist_ok=True, private=True)
    import huggingface_hub.constants as hf_constants

    hf_constants.HF_HUB_DISABLE_XET = True  # upload through LFS; the fixture puts the switch back
    sha = api.upload_file(path_or_fileobj=b"\0" * 300_000, path_in_repo="w.safetensors", repo_id=repo).oid
    r = httpx2.head(f"{hub.endpoint}/{repo}/resolve/main/w.safetensors",
                    headers={"Authorization": "Bearer hf_testtoken_tester"})
    assert r.status_code == 302 and r.headers["X-Repo-Commit"] == sha
    import hf_xet

    data_path = Path(hub.data_dir) / "blobs" / "lfs"
    blob = next(p for p in data_path.rglob("*") if p.is_file() and p.stat().st_size == 300_000)
    assert r.headers["X-Xet-Hash"] == hf_xet.hash_files([str(blob)])[0].hash  # the real Xet file hash
    assert r.headers["Link"] == f'<{hub.endpoint}/api/models/{repo}/xet-read-token/{sha}>; rel="xet-auth"'
    assert r.headers["X-Linked-Size"] == "300000"
    t = httpx2.get(f"{hub.endpoint}/api/models/{repo}/xet-read-token/{sha}",
                   headers={"Authorization": "Bearer hf_testtoken_tester"})
    assert t.status_code == 200 and t.json()["casUrl"] == hub.storage_url
    assert t.headers["X-Xet-Access-Token"] == t.json()["accessToken"]
    # a private repo's CAS token needs the Hub token of someone who may read it
    assert httpx2.get(f"{hub.endpoint}/api/models/{repo}/xet-read-token/{sha}").status_code == 401
    assert httpx2.get(f"{hub.endpoint}/api/models/{repo}/xet-read-token/{sha}",
                      headers={"Authorization": "Bearer hf_testtoken_other"}).status_code == 404
    # a read token does not upload
    w = httpx2.post(f"{hub.storage_url}/v1/xorbs/default/{'0' * 64}", content=b"x",
                    headers={"Authorization": f"Bearer {t.json()['accessToken']}"})
    assert w.status_code == 403


# ---------------------------------------------------------------- push through Xet

def _pr_refs(repo: str) -> list[str]:
    return sorted(r.ref for r in HfApi().list_repo_refs(repo, include_pull_requests=True).pull_requests or [])


def test_push_goes_through_xet_plain_create_pr_and_revision_with_one_pr_on_a_lost_answer(
        family, tmp_path, hub_user, storage, hub_faults):
    from huggingface_hub import hf_hub_download

    from hf_metagpt.publish.push import push

    folders, expected = family
    out = tmp_path / "merged"
    hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(out), device="cpu",
                     progress=False)
    hub = storage(xet=True)
    repo = f"{hub_user}/xet-push"
    hub.clear_requests()
    push(out, repo)
    posted = [(r.method, r.path.rsplit("/", 1)[0] if "/xorbs/" in r.path else r.path, r.status)
              for r in hub.requests if r.path.startswith(("/v1/", "/v2/", "/_lfs/"))]
    assert ("POST", "/v1/xorbs/default", 200) in posted and ("POST", "/v2/shards", 200) in posted
    assert not [p for p in posted if p[1].startswith("/_lfs/")]  # no git-LFS transfer: Xet only
    for name, data in expected.items():
        got = hf_hub_download(repo, name, cache_dir=tmp_path / "c1")
        assert Path(got).read_bytes() == data  # rebuilt from the xorbs, served back through Xet

    (out / "dev.txt").write_text("a change for the branch")
    push(out, repo, revision="dev", commit_message="to dev")
    assert HfApi().list_repo_commits(repo, revision="dev")[0].title == "to dev"

    (out / "extra.txt").write_text("a change for the pull request")
    lost = hub_faults.inject_fault(rf"^/api/models/{re.escape(repo)}/commit/main$", method="POST",
                                   lose_answer=True)
    before = _pr_refs(repo)
    url = push(out, repo, create_pr=True, commit_message="proposal")
    after = _pr_refs(repo)
    assert lost.hits == 1
    assert len(after) == len(before) + 1  # the retry found the PR its lost answer had opened
    assert url.endswith(f"/{repo}/discussions/{after[-1].rsplit('/', 1)[1]}")
    assert HfApi().list_repo_commits(repo, revision=after[-1])[0].title == "proposal"


def test_a_commit_that_never_succeeds_over_xet_is_one_post_per_attempt(family, tmp_path, hub_user, hub_faults):
    """push commits with create_commit, which huggingface_hub does not retry (its upload pipeline,
    upload_folder with hf_xet, retries the commit POST 5 times, 1-8 s apart: under our own 5 attempts
    that made 30 POSTs and 116 s, measured). Over Xet too: 5 attempts, 5 POSTs, one clear error."""
    from hf_metagpt.errors import HubUnavailableError
    from hf_metagpt.publish.push import push

    folders, _ = family
    out = tmp_path / "merged"
    hf_metagpt.merge(base=str(folders[0]), models=[str(folders[1])], output=str(out), device="cpu", progress=False)
    repo = f"{hub_user}/xet-commit-down"
    fault = hub_faults.inject_fault(rf"^/api/models/{re.escape(repo)}/commit/", status=503, times=None, method="POST")
    hub_faults.clear_requests()
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as err:
        push(out, repo)
    assert time.monotonic() - start < 30
    assert fault.hits == hub_calls.RETRIES + 1
    assert [r for r in hub_faults.requests if r.path == "/v2/shards" and r.status == 200]  # the files went by Xet
    assert err.value.message.startswith(f"{repo}: the Hub kept failing after {hub_calls.RETRIES + 1} attempts "
                                        "(HTTP 503 on POST ")
    assert "nothing was published" in err.value.hint
    assert HfApi().list_repo_commits(repo)[0].title == "initial commit"


def test_upload_folder_with_create_pr_through_the_xet_pipeline_opens_one_pull_request(tmp_path, hub_user, hub_faults):
    """huggingface_hub's upload pipeline (upload_folder with hf_xet) opens the PR first with
    create_pull_request (POST .../discussions: a 404 here before) and commits to refs/pr/N, so a lost
    commit answer, which it retries itself, stays in that one PR."""
    api = HfApi()
    repo = f"{hub_user}/xet-pipeline-pr"
    api.create_repo(repo, exist_ok=True)
    (tmp_path / "a.txt").write_text("main")
    api.upload_folder(repo_id=repo, folder_path=tmp_path)
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 400)
    lost = hub_faults.inject_fault(rf"^/api/models/{re.escape(repo)}/commit/refs/pr/1$", method="POST",
                                   lose_answer=True)
    hub_faults.clear_requests()
    info = api.upload_folder(repo_id=repo, folder_path=tmp_path, create_pr=True, commit_message="proposal")
    opened = [r.status for r in hub_faults.requests if r.method == "POST" and r.path == f"/api/models/{repo}/discussions"]
    assert opened == [200] and lost.hits == 1
    assert info.pr_url.endswith(f"/{repo}/discussions/1") and info.pr_revision == "refs/pr/1"
    assert _pr_refs(repo) == ["refs/pr/1"]
    assert api.get_discussion_details(repo, 1).title == "proposal"
    assert "w.bin" in api.list_repo_files(repo, revision="refs/pr/1") and "w.bin" not in api.list_repo_files(repo)


def test_a_lost_commit_answer_on_a_plain_push_makes_one_commit(family, tmp_path, hub_user, hub_faults):
    from hf_metagpt.publish.push import push

    folders, _ = family
    out = tmp_path / "merged"
    hf_metagpt.merge(base=str(folders[0]), models=[str(folders[1])], output=str(out), device="cpu", progress=False)
    repo = f"{hub_user}/lost-answer"
    push(out, repo)
    n = len(HfApi().list_repo_commits(repo))
    (out / "extra.txt").write_text("one more file")
    fault = hub_faults.inject_fault(rf"^/api/models/{re.escape(repo)}/commit/main$", method="POST", lose_answer=True)
    push(out, repo, commit_message="second")
    assert fault.hits == 1
    commits = HfApi().list_repo_commits(repo)
    assert len(commits) == n + 1 and commits[0].title == "second"


# ---------------------------------------------------------------- Xet: cancellation and errors

def _unseen_family(root: Path, seed: int) -> list[Path]:
    """Weights no earlier test downloaded: hf_xet's chunk cache and huggingface_hub's blobs shared by
    Xet hash would otherwise serve them without a transfer."""
    base, fts = build_family(root, n_models=2, seed=seed)
    return [base, *fts]


def test_closing_the_downloads_cancels_xet_transfers_within_2_s(tmp_path, hub_user, storage, hub_faults, capfd):
    """Closed while one download is inside a Xet transfer and the other still at its HEAD request.

    The held one reaches hf_xet after the abort, where huggingface_hub takes a *fresh* session:
    unless its progress bar refuses to start, it then runs to its end (measured before the fix:
    7.5 s, the 1 s HEAD plus the whole 6 s xorb fetch). This process uploaded through Xet just
    before (`publish`, and the push tests above): the abort must work after an upload too.
    """
    import threading

    import hf_metagpt.engine.fetch as fetch

    folders = _unseen_family(tmp_path / "fam", seed=2511)
    hub = storage(xet=True)
    ids = publish(folders, hub_user, "xetcancel")  # a Xet upload in this process, as a merge-and-push has
    assert [r for r in hub.requests if r.path == "/v2/shards" and r.status == 200]
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    fetch.download(plan, weights=False, weight_index=True)
    slow = hub_faults.inject_fault(r"^/xorbs/default/", status=None, delay=6.0, times=None, method="GET")
    files = fetch.OverlappedFiles(plan, workers=2)
    (i, name) = files.order[1]  # the second worker's first file: hold its HEAD
    held = hub_faults.inject_fault(rf"^/{re.escape(ids[i])}/resolve/[^/]+/{re.escape(name)}$", status=None,
                                   delay=1.0, times=None, method="HEAD")
    capfd.readouterr()
    deadline = time.monotonic() + 20
    while (slow.hits == 0 or held.hits == 0) and time.monotonic() < deadline:  # a Xet transfer is under way
        time.sleep(0.02)
    assert slow.hits >= 1 and held.hits == 1
    start = time.monotonic()
    files.close()
    took = time.monotonic() - start
    assert took < 2.0, took  # not the 6 s the slowed xorb fetch takes (nor the queued shards after it)
    assert not [t for t in threading.enumerate() if t.name.startswith(fetch.DOWNLOAD_THREADS)]
    assert "Traceback" not in capfd.readouterr().err  # nothing raised inside hf_xet
    assert slow.hits == 1  # the held download never reached the xorbs


def test_xet_errors_are_mapped_to_hub_errors_with_a_hint(tmp_path, hub_user, storage, hub_faults):
    folders = _unseen_family(tmp_path / "fam", seed=2512)
    ids = publish(folders, hub_user, "xeterr")
    storage(xet=True)
    hub_faults.inject_fault(r"^/v[12]/reconstructions/", status=403, times=None, method="GET")
    start = time.monotonic()
    with pytest.raises(hub_calls.HubAccessError) as err:
        _merge(ids, tmp_path / "out")
    assert time.monotonic() - start < 60
    assert not isinstance(err.value, hub_calls.HubUnavailableError)
    assert "the Hub's Xet storage refused the transfer (Xet storage: HTTP 403 on /v2/reconstructions/" \
        in err.value.message
    assert "HF_HUB_DISABLE_XET=1" in err.value.hint and "token" in err.value.hint
    assert "http://" not in str(err.value)  # no host, no signed URL


def test_xet_failures_are_classified():
    e503 = RuntimeError("Task error: File reconstruction error: CAS Client Error: Request error: HTTP status "
                        "server error (503 Service Unavailable), domain: http://127.0.0.1:1/v2/reconstructions/ab")
    assert hub_calls.xet_status(e503) == 503 and hub_calls.transient(e503)
    mapped = hub_calls.hub_error("org/m", e503)
    assert isinstance(mapped, hub_calls.HubUnavailableError)
    assert mapped.message == ("org/m: the Hub's Xet storage kept failing (Xet storage: HTTP 503 on "
                              "/v2/reconstructions/ab).")
    e404 = RuntimeError("CAS Client Error: Request error: HTTP status client error (404 Not Found), domain: x")
    assert hub_calls.xet_status(e404) == 404 and not hub_calls.transient(e404)
    net = ConnectionError("Network error: Request error: error sending request")
    assert hub_calls.xet_status(net) == 0 and hub_calls.transient(net)
    assert hub_calls.xet_status(RuntimeError("something else")) is None
