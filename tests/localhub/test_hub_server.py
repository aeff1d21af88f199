"""The local Hub, driven only through huggingface_hub's real client (and transformers, datasets).

conftest.py starts the server and points HF_ENDPOINT at it before huggingface_hub is imported.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
from huggingface_hub.utils import build_hf_headers, get_session
from safetensors.torch import save_file

from hf_metagpt.localhub import LocalHub, git_blob_sha1

MB = 1024 * 1024


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def api() -> HfApi:
    return HfApi()


@pytest.fixture
def repo(api, hub_user, request) -> str:
    """A fresh public model repo named after the test."""
    repo_id = f"{hub_user}/{request.node.name.replace('_', '-')[:60]}"
    api.create_repo(repo_id)
    return repo_id


def test_whoami_and_create_repo_with_exist_ok(api, hub_user, hub_endpoint):
    assert api.whoami()["name"] == hub_user
    url = api.create_repo("made-twice")
    assert url == f"{hub_endpoint}/{hub_user}/made-twice"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("made-twice")
    assert err.value.response.status_code == 409
    # exist_ok reads the url from the 409's body
    assert api.create_repo("made-twice", exist_ok=True) == url
    # a new repo holds one commit with the default .gitattributes, like on the Hub
    assert api.list_repo_files(f"{hub_user}/made-twice") == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits(f"{hub_user}/made-twice")] == ["initial commit"]


def test_upload_folder_sends_big_files_through_xet_and_downloads_them_byte_exact(api, repo, local_hub, tmp_path):
    """The default path (hf_xet installed, the Hub Xet-backed): a file above the 8 MiB cap of JSON bodies
    travels as a xorb (refused with a 413 until the CAS took xorbs of up to 64 MiB) and a shard."""
    big = _bytes(11 * MB, 3)
    (tmp_path / "weights.bin").write_bytes(big)
    (tmp_path / "config.json").write_bytes(b"{}")
    local_hub.clear_requests()
    commit = api.upload_folder(folder_path=tmp_path, repo_id=repo, commit_message="weights")
    posted = [(r.method, r.path.rsplit("/", 1)[0], r.status) for r in local_hub.requests
              if r.path.startswith(("/v1/xorbs/", "/v2/shards", "/_lfs/"))]
    assert ("POST", "/v1/xorbs/default", 200) in posted and ("POST", "/v2", 200) in posted
    assert not [p for p in posted if p[1].startswith("/_lfs")]  # no git-LFS transfer
    big_sha = hashlib.sha256(big).hexdigest()
    sib = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    assert sib["weights.bin"].lfs.sha256 == big_sha and sib["weights.bin"].size == 11 * MB
    local_hub.clear_requests()
    assert Path(hf_hub_download(repo, "weights.bin", revision=commit.oid)).read_bytes() == big
    assert [r for r in local_hub.requests if "/reconstructions/" in r.path and r.status == 200]


def test_upload_folder_sends_big_files_through_lfs_and_downloads_them_byte_exact(api, repo, local_hub, tmp_path,
                                                                                 http_only):
    big, small = _bytes(11 * MB, 1), b'{"hidden_size": 32}\n'
    (tmp_path / "weights.bin").write_bytes(big)
    (tmp_path / "config.json").write_bytes(small)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hello")
    local_hub.clear_requests()
    commit = api.upload_folder(folder_path=tmp_path, repo_id=repo, commit_message="weights")

    big_sha = hashlib.sha256(big).hexdigest()
    puts = [r for r in local_hub.requests if r.method == "PUT"]
    assert [(r.path, r.status) for r in puts] == [(f"/_lfs/{big_sha}", 200)]
    assert all(r.query == "" for r in puts)  # the signed upload URL is not kept in the log

    info = api.model_info(repo, files_metadata=True)
    assert info.sha == commit.oid
    sib = {s.rfilename: s for s in info.siblings}
    assert sorted(sib) == [".gitattributes", "config.json", "sub/notes.txt", "weights.bin"]
    assert sib["weights.bin"].size == 11 * MB
    assert sib["weights.bin"].lfs.sha256 == big_sha and sib["weights.bin"].lfs.size == 11 * MB
    assert sib["config.json"].lfs is None and sib["config.json"].blob_id == git_blob_sha1(small)
    assert sib["config.json"].size == len(small)
    # like the Hub, sizes only come when asked for
    assert api.model_info(repo).siblings[0].size is None
    assert api.list_repo_files(repo) == sorted(sib)

    path = hf_hub_download(repo, "weights.bin")
    assert Path(path).read_bytes() == big
    assert Path(hf_hub_download(repo, "sub/notes.txt")).read_text() == "hello"
    meta = api.get_hf_file_metadata(url=hf_hub_url(repo, "weights.bin"))
    assert (meta.etag, meta.size, meta.commit_hash) == (big_sha, 11 * MB, commit.oid)
    meta = api.get_hf_file_metadata(url=hf_hub_url(repo, "config.json"))
    assert (meta.etag, meta.size) == (git_blob_sha1(small), len(small))

    # re-uploading the same folder is a no-op: preupload reports the remote oids
    again = api.upload_folder(folder_path=tmp_path, repo_id=repo)
    assert again.oid == commit.oid


def test_create_commit_with_create_pr_opens_refs_pr_n_and_leaves_main_alone(api, repo):
    main_before = api.model_info(repo).sha
    info = api.create_commit(repo, operations=[CommitOperationAdd("proposal.txt", b"please merge")],
                             commit_message="proposal", create_pr=True)
    assert info.pr_url.endswith(f"/{repo}/discussions/1")
    assert (info.pr_revision, info.pr_num) == ("refs/pr/1", 1)
    assert api.model_info(repo).sha == main_before
    assert Path(hf_hub_download(repo, "proposal.txt", revision="refs/pr/1")).read_bytes() == b"please merge"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "proposal.txt")
    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", info.oid)]
    # a second PR gets the next number; a commit can also go onto an open PR
    second = api.create_commit(repo, operations=[CommitOperationAdd("b.txt", b"b")], commit_message="b",
                               create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    onto = api.create_commit(repo, operations=[CommitOperationAdd("c.txt", b"c")], commit_message="c",
                             revision="refs/pr/1")
    assert api.model_info(repo, revision="refs/pr/1").sha == onto.oid
    assert api.list_repo_commits(repo, revision="refs/pr/1")[1].commit_id == info.oid


def test_downloads_pin_branch_tag_and_full_sha(api, repo, tmp_path):
    v1 = api.upload_file(path_or_fileobj=b"one", path_in_repo="v.txt", repo_id=repo).oid
    api.create_tag(repo, tag="v1")
    api.create_branch(repo, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="v.txt", repo_id=repo, revision="dev")
    v2 = api.upload_file(path_or_fileobj=b"two", path_in_repo="v.txt", repo_id=repo).oid
    assert v1 != v2

    def get(rev):
        return Path(hf_hub_download(repo, "v.txt", revision=rev)).read_bytes()

    assert (get("main"), get("v1"), get("dev"), get(v1), get(v2)) == (b"two", b"one", b"dev", b"one", b"two")
    refs = api.list_repo_refs(repo)
    assert {r.name: r.target_commit for r in refs.tags} == {"v1": v1}
    assert sorted(r.name for r in refs.branches) == ["dev", "main"]
    assert api.model_info(repo, revision="v1").sha == v1
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "v.txt", revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(repo, branch="dev", exist_ok=True)
    api.delete_branch(repo, branch="dev")
    assert [r.name for r in api.list_repo_refs(repo).branches] == ["main"]


def test_snapshot_download_with_allow_patterns_at_a_pinned_revision(api, repo, tmp_path):
    first = api.create_commit(repo, commit_message="first", operations=[
        CommitOperationAdd("config.json", b"{}"), CommitOperationAdd("model.safetensors", b"\0" * 64),
        CommitOperationAdd("extra/readme.txt", b"x")]).oid
    api.create_commit(repo, commit_message="second", operations=[CommitOperationAdd("config.json", b'{"v": 2}')])
    out = Path(snapshot_download(repo, revision=first, allow_patterns=["*.json", "extra/*"],
                                 local_dir=tmp_path / "snap"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert files == ["config.json", "extra/readme.txt"]
    assert (out / "config.json").read_bytes() == b"{}"


def test_get_safetensors_metadata_reads_shard_headers_with_range_requests(api, repo, local_hub, tmp_path, http_only):
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.ones(5, dtype=torch.bfloat16),
                                             "b.bias": torch.zeros(2, 7, dtype=torch.float16)},
    }
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    index = {"metadata": {"total_size": 48 + 10 + 28},
             "weight_map": {k: name for name, t in shards.items() for k in t}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    api.upload_folder(folder_path=tmp_path, repo_id=repo)

    local_hub.clear_requests()
    meta = api.get_safetensors_metadata(repo)
    assert meta.sharded and meta.metadata == {"total_size": 86}
    assert meta.weight_map == index["weight_map"]
    files = meta.files_metadata
    assert files["model-00001-of-00002.safetensors"].tensors["a.weight"].shape == [3, 4]
    assert files["model-00002-of-00002.safetensors"].tensors["b.bias"].dtype == "F16"
    ranged = sorted((r.path.rsplit("/", 1)[-1], r.range, r.status) for r in local_hub.requests if r.range)
    assert ranged == [(name, "bytes=0-100000", 206) for name in sorted(shards)]

    # the endpoint get_sharded_safetensors_metadata uses answers the same
    sharded = api.get_sharded_safetensors_metadata(repo)
    assert sharded.weight_map == index["weight_map"]

    # explicit ranges: a slice, a suffix, and a start past the end
    url = hf_hub_url(repo, "model-00001-of-00002.safetensors")
    blob = (tmp_path / "model-00001-of-00002.safetensors").read_bytes()
    r = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=8-15"})
    assert (r.status_code, r.content, r.headers["Content-Range"]) == (206, blob[8:16], f"bytes 8-15/{len(blob)}")
    r = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=-4"})
    assert (r.status_code, r.content) == (206, blob[-4:])
    r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={len(blob)}-"})
    assert (r.status_code, r.headers["Content-Range"]) == (416, f"bytes */{len(blob)}")


def test_private_repo_needs_the_owners_token_for_every_read(api, hub_user, hub_other_token, tmp_path):
    repo_id = f"{hub_user}/secret"
    api.create_repo(repo_id, private=True)
    api.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id=repo_id)
    assert api.model_info(repo_id).private is True
    assert Path(hf_hub_download(repo_id, "s.txt")).read_bytes() == b"s3cret"

    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(repo_id, token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(repo_id, token=hub_other_token)
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(repo_id, token=hub_other_token)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=hub_other_token, cache_dir=tmp_path)
    # a repo that does not exist looks exactly the same
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub_user}/nothing-here")
    api.update_repo_settings(repo_id, private=False)
    assert api.model_info(repo_id, token=False).private is False


def test_writes_need_the_owners_token(api, repo, hub_other_token, hub_other_user):
    other = HfApi(token=hub_other_token)
    with pytest.raises(HfHubHTTPError) as err:
        other.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        other.create_repo(repo.replace(repo.split("/")[0], "testorg"))  # other is not in testorg
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_real_token").model_info(repo)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, token=False)
    assert err.value.response.status_code == 401
    assert other.whoami()["name"] == hub_other_user
    assert other.create_repo("mine").endswith(f"/{hub_other_user}/mine")
    # tester is a member of testorg
    assert api.create_repo("testorg/shared").endswith("/testorg/shared")
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_stale_parent_commit_is_refused_with_412(api, repo):
    parent = api.model_info(repo).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo, parent_commit=parent)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id=repo, parent_commit=parent)
    assert err.value.response.status_code == 412
    assert Path(hf_hub_download(repo, "a.txt")).read_bytes() == b"1"


def test_delete_file_and_folder(api, repo):
    api.create_commit(repo, commit_message="add", operations=[
        CommitOperationAdd("keep.txt", b"k"), CommitOperationAdd("d/a.txt", b"a"),
        CommitOperationAdd("d/e/b.txt", b"b"), CommitOperationAdd("gone.txt", b"g")])
    api.create_commit(repo, commit_message="delete", operations=[
        CommitOperationDelete("gone.txt"), CommitOperationDelete("d/", is_folder=True)])
    assert api.list_repo_files(repo) == [".gitattributes", "keep.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("gone.txt", repo_id=repo)
    tree = api.list_repo_tree(repo, recursive=True)
    assert sorted(e.path for e in tree) == [".gitattributes", "keep.txt"]


def test_tree_and_paths_info_list_folders_and_files(api, repo):
    api.create_commit(repo, commit_message="add", operations=[
        CommitOperationAdd("top.txt", b"t"), CommitOperationAdd("d/a.txt", b"a"),
        CommitOperationAdd("d/e/b.bin", b"\0b")])
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(repo)}
    assert top == {("RepoFile", ".gitattributes"), ("RepoFile", "top.txt"), ("RepoFolder", "d")}
    deep = {e.path for e in api.list_repo_tree(repo, path_in_repo="d", recursive=True)}
    assert deep == {"d/a.txt", "d/e", "d/e/b.bin"}
    info = {e.path: e for e in api.get_paths_info(repo, ["d", "d/e/b.bin", "missing"])}
    assert sorted(info) == ["d", "d/e/b.bin"]
    assert info["d/e/b.bin"].lfs.sha256 == hashlib.sha256(b"\0b").hexdigest()  # binary => LFS


def test_repos_survive_a_restart_with_the_same_data_dir(tmp_path, hub_token):
    data = tmp_path / "data"
    with LocalHub(data, tokens={hub_token: "tester"}) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub_token)
        api.create_repo("kept", private=True)
        lfs_bytes = _bytes(2 * MB, 7)
        main = api.create_commit("tester/kept", commit_message="c", operations=[
            CommitOperationAdd("w.safetensors", lfs_bytes), CommitOperationAdd("a.txt", b"a")]).oid
        api.create_tag("tester/kept", tag="v1")
        pr = api.create_commit("tester/kept", commit_message="pr", create_pr=True,
                               operations=[CommitOperationAdd("a.txt", b"b")])
    with LocalHub(data, tokens={hub_token: "tester"}) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub_token)
        info = api.model_info("tester/kept", files_metadata=True)
        assert (info.sha, info.private) == (main, True)
        assert {s.rfilename: s.size for s in info.siblings}["w.safetensors"] == 2 * MB
        refs = api.list_repo_refs("tester/kept", include_pull_requests=True)
        assert [r.target_commit for r in refs.tags] == [main]
        assert [r.target_commit for r in refs.pull_requests] == [pr.oid]
        got = hf_hub_download("tester/kept", "w.safetensors", endpoint=hub.endpoint, token=hub_token,
                              cache_dir=tmp_path / "cache")
        assert Path(got).read_bytes() == lfs_bytes
        # numbering continues after the restart
        nxt = api.create_commit("tester/kept", commit_message="pr2", create_pr=True,
                                operations=[CommitOperationAdd("a.txt", b"c")])
        assert nxt.pr_revision == "refs/pr/2"


def test_interrupted_lfs_upload_leaves_nothing_visible(tmp_path, hub_token):
    with LocalHub(tmp_path / "data", tokens={hub_token: "tester"}) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub_token)
        api.create_repo("half")
        content = _bytes(3 * MB, 3)
        info = UploadInfo.from_bytes(content)
        actions, errors, _ = post_lfs_batch_info(upload_infos=[info], token=hub_token, repo_type="model",
                                                 repo_id="tester/half", endpoint=hub.endpoint)
        href = actions[0]["actions"]["upload"]["href"]
        # send half the announced bytes, then vanish
        target = httpx2.URL(href)
        conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
        conn.putrequest("PUT", target.raw_path.decode())
        conn.putheader("Content-Length", str(len(content)))
        conn.endheaders()
        conn.send(content[: len(content) // 2])
        conn.close()
        # the blob is still unknown, and a commit pointing at it is refused
        actions, _, _ = post_lfs_batch_info(upload_infos=[info], token=hub_token, repo_type="model",
                                            repo_id="tester/half", endpoint=hub.endpoint)
        assert "actions" in actions[0]
        assert not list((tmp_path / "data" / "blobs" / "lfs").rglob(info.sha256.hex()))
        # a PUT with the wrong bytes is refused too
        r = get_session().put(href, content=content[::-1])
        assert r.status_code == 400
        assert not list((tmp_path / "data" / "blobs" / "lfs").rglob(info.sha256.hex()))
        # and the full upload then works
        api.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="tester/half")
        assert api.model_info("tester/half", files_metadata=True).siblings[1].lfs.sha256 == info.sha256.hex()
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_paths_cannot_escape_the_data_folder(api, repo, hub_endpoint, hub_token):
    headers = {**build_hf_headers(), "Content-Type": "application/x-ndjson"}
    for bad in ("../evil.txt", "/etc/evil.txt", "a/../../evil.txt", ".git/config", "C:/evil.txt"):
        payload = [{"key": "header", "value": {"summary": "evil"}},
                   {"key": "file", "value": {"path": bad, "content": base64.b64encode(b"x").decode(),
                                             "encoding": "base64"}}]
        body = b"".join(json.dumps(p).encode() + b"\n" for p in payload)
        r = get_session().post(f"{hub_endpoint}/api/models/{repo}/commit/main", headers=headers, content=body)
        assert r.status_code == 400, bad
        assert "Invalid path" in r.json()["error"]
    assert api.list_repo_files(repo) == [".gitattributes"]
    # in URLs: quoted or raw dot segments never reach the disk
    for path in ("/%2E%2E/%2E%2E/etc/passwd", f"/{repo}/resolve/main/..%2F..%2Flog.jsonl",
                 f"/api/models/{repo}/tree/main/..%2F.."):
        conn = http.client.HTTPConnection(hub_endpoint.split("//")[1], timeout=10)
        conn.request("GET", path, headers={"Authorization": f"Bearer {hub_token}"})
        resp = conn.getresponse()
        assert resp.status == 400, path
        assert "error" in json.loads(resp.read())
        conn.close()


def test_unknown_routes_answer_404_json(hub_endpoint):
    r = get_session().get(f"{hub_endpoint}/api/no/such/thing/here")
    assert r.status_code == 404
    assert r.json() == {"error": "Not Found"}
    assert r.headers["X-Error-Code"] == "EndpointNotFound"


def test_injected_faults_fail_the_next_requests_then_clear(api, repo, hub_faults):
    fault = hub_faults.inject_fault(rf"^/api/models/{repo}$", status=503, times=1)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(repo)
    assert err.value.response.status_code == 503
    assert api.model_info(repo).id == repo  # only once
    assert fault.hits == 1
    hub_faults.inject_fault(r"/resolve/", drop=True, times=1)
    url = hf_hub_url(repo, ".gitattributes")
    with pytest.raises(httpx2.TransportError):
        get_session().get(url)
    assert get_session().get(url).status_code == 200


def test_dataset_repos_download_and_load_with_datasets(api, hub_user):
    import datasets

    repo_id = f"{hub_user}/rows"
    api.create_repo(repo_id, repo_type="dataset")
    rows = [{"text": f"row {i}", "label": i} for i in range(5)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    api.upload_file(path_or_fileobj=data, path_in_repo="data/train.jsonl", repo_id=repo_id, repo_type="dataset")
    assert api.dataset_info(repo_id).id == repo_id
    assert Path(hf_hub_download(repo_id, "data/train.jsonl", repo_type="dataset")).read_bytes() == data
    ds = datasets.load_dataset(repo_id, split="train")
    assert ds["text"] == [r["text"] for r in rows] and ds["label"] == list(range(5))


def test_transformers_round_trip_of_a_tiny_llama(api, hub_user, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "tiny")
    api.create_repo(f"{hub_user}/tiny")
    api.upload_folder(folder_path=tmp_path / "tiny", repo_id=f"{hub_user}/tiny")
    loaded = AutoModelForCausalLM.from_pretrained(f"{hub_user}/tiny")
    key = "model.layers.1.mlp.down_proj.weight"
    assert loaded.state_dict()[key].shape == (32, 64)
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_cli_hub_serve_prints_the_environment_and_serves_until_interrupted(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    proc = subprocess.Popen([sys.executable, "-m", "hf_metagpt", "hub", "serve", "--data", str(tmp_path / "d"),
                             "--token", "alice:hf_cli_token"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("export HF_ENDPOINT=http://127.0.0.1:"), proc.stderr.read()
        assert proc.stdout.readline().strip() == "export HF_HUB_DISABLE_XET=1"
        endpoint = first.split("=", 1)[1]
        req = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={"Authorization": "Bearer hf_cli_token"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["name"] == "alice"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "hf_cli_token" not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
