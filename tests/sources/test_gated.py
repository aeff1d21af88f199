"""Gated repos: the message names the model, the page to accept its licence on, and the token it needs.

The mapping is tested once with the client's own error, then against the local Hub's gated repos
(401/403 with `X-Error-Code: GatedRepo` on file requests, info and listings public, as the Hub does):
by ID, nothing of a gated base is downloaded until access is granted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

try:  # the HTTP client huggingface_hub talks through (httpx2 from 2.x on)
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.localhub import LocalHub
from hf_metagpt.errors import HubAccessError
from hf_metagpt.sources.hub_calls import call as _call
from helpers import shards


def test_a_gated_repo_names_the_model_its_page_and_the_token(monkeypatch):
    url = f"{constants.ENDPOINT}/api/models/meta-llama/Llama-2-7b-hf/revision/main"
    response = httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"}, request=httpx2.Request("GET", url))

    def gated(*_a, **_k):
        raise GatedRepoError("Access to model meta-llama/Llama-2-7b-hf is restricted.", response=response)

    try:
        _call("meta-llama/Llama-2-7b-hf@main", gated)
    except HubAccessError as exc:
        text = str(exc)
    else:
        raise AssertionError("a gated repo was not refused")
    assert text.startswith("meta-llama/Llama-2-7b-hf@main is gated: its licence must be accepted")
    assert f"{constants.ENDPOINT.rstrip('/')}/meta-llama/Llama-2-7b-hf (logged in)" in text
    assert "--token, HF_TOKEN or `hf auth login`" in text


# ---------------------------------------------------------------- the local Hub's gated repos

@pytest.fixture(scope="module")
def gated(tmp_path_factory, hub_new_user, hub_user, local_hub):
    """A tiny family by ID: its base gated (owned by another account), the fine-tunes public."""
    root = tmp_path_factory.mktemp("gated")
    # A seed no other test uses: the local Hub is shared by the whole session, and a blob some other
    # public repo holds may rightly be committed by anyone (the claim test needs bytes only this repo has).
    base, fts = build_family(root, n_models=2, spec=TinySpec(max_shard_size="100KB"), seed=90817)
    clean = root / "merged-locally"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(clean), device="cpu", progress=False)
    owner_token, owner = hub_new_user("licensor")
    tag = os.urandom(3).hex()
    ids = [f"{owner}/gated-base-{tag}", *(f"{hub_user}/gated-ft-{tag}-{f.name}" for f in fts)]
    for repo, folder, token in zip(ids, [base, *fts], [owner_token, None, None]):
        api = HfApi(token=token)
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="tiny replica")
    local_hub.set_gated(ids[0], "manual")
    return ids, owner_token, clean, base


def _file_requests(requests, repo_id: str) -> list:
    """Requests for the files of `repo_id`: HEAD, whole GET or Range GET of /resolve/."""
    return [r for r in requests if r.path.startswith(f"/{repo_id}/resolve/")]


def _cached_blobs(repo_id: str) -> list[Path]:
    ns, name = repo_id.split("/")
    return list((Path(constants.HF_HUB_CACHE) / f"models--{ns}--{name}" / "blobs").glob("*"))


def test_the_local_hub_shows_a_gated_repo_but_serves_its_files_only_with_access(gated, hub_endpoint,
                                                                               hub_other_token, hub_other_user,
                                                                               local_hub, tmp_path):
    ids, owner_token, _, base = gated
    repo = ids[0]
    # Info and listings stay public, as on the Hub, with the gate's mode.
    for token in (False, hub_other_token):
        info = HfApi(token=token).model_info(repo, files_metadata=True)
        assert info.gated == "manual" and "config.json" in {s.rfilename for s in info.siblings}
    assert "config.json" in HfApi(token=False).list_repo_files(repo)

    shard = next(p.name for p in sorted(base.glob("model-*.safetensors")))
    url = f"{hub_endpoint}/{repo}/resolve/main/{shard}"
    # No token: 401, the Hub's "log in" wording; another account: 403, the page to ask on.
    for token, status, words in [(False, 401, "You must have access to it and be authenticated"),
                                 (hub_other_token, 403, f"not in the authorized list. Visit {hub_endpoint}/{repo} ")]:
        with pytest.raises(GatedRepoError) as err:
            hf_hub_download(repo, "config.json", token=token)
        assert err.value.response.status_code == status and words in str(err.value)
        with pytest.raises(GatedRepoError):
            get_hf_file_metadata(url, token=token)  # a HEAD (size, ETag) is refused too
        with pytest.raises(GatedRepoError):
            HfApi(token=token).get_safetensors_metadata(repo)
        headers = {"Range": "bytes=0-100000"} | ({"Authorization": f"Bearer {token}"} if token else {})
        ranged = httpx2.get(url, headers=headers)  # the safetensors header read
        assert (ranged.status_code, ranged.headers["X-Error-Code"]) == (status, "GatedRepo")
        assert ranged.json() == {"error": ranged.headers["X-Error-Message"]}  # JSON, not a byte of the shard

    # (its own cache: the merge test checks that the shared cache never gets a file of this repo)
    owned = hf_hub_download(repo, shard, token=owner_token, cache_dir=tmp_path)
    assert Path(owned).read_bytes() == (base / shard).read_bytes()
    local_hub.grant_access(repo, hub_other_user)
    try:
        assert get_hf_file_metadata(url, token=hub_other_token).size == (base / shard).stat().st_size
    finally:
        local_hub.revoke_access(repo, hub_other_user)
    with pytest.raises(GatedRepoError):
        get_hf_file_metadata(url, token=hub_other_token)

    # The Hub's own setting: only the owner may change it ("auto" still needs a grant here).
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=hub_other_token).update_repo_settings(repo, gated=False)
    assert err.value.response.status_code == 403
    HfApi(token=owner_token).update_repo_settings(repo, gated="auto")
    try:
        assert HfApi(token=False).model_info(repo).gated == "auto"
        with pytest.raises(GatedRepoError):
            get_hf_file_metadata(url, token=hub_other_token)
    finally:
        local_hub.set_gated(repo, "manual")
    with pytest.raises(ValueError, match="'auto', 'manual' or False"):
        local_hub.set_gated(repo, True)
    with pytest.raises(ValueError, match="Invalid repo id"):
        local_hub.grant_access("../etc", hub_other_user)
    with pytest.raises(ValueError, match="Invalid user name"):
        local_hub.grant_access(repo, "bad\nname")


def test_a_gated_file_cannot_be_claimed_by_committing_its_pointer_elsewhere(gated, hub_endpoint, hub_other_token,
                                                                            hub_other_user, local_hub):
    _, _, _, base = gated
    shard = next(p for p in sorted(base.glob("model-*.safetensors")))
    oid = hashlib.sha256(shard.read_bytes()).hexdigest()
    mine = f"{hub_other_user}/claim-{os.urandom(3).hex()}"
    HfApi(token=hub_other_token).create_repo(mine)
    lines = [{"key": "header", "value": {"summary": "claim", "description": ""}},
             {"key": "lfsFile", "value": {"path": shard.name, "algo": "sha256", "oid": oid}}]
    answer = httpx2.post(f"{hub_endpoint}/api/models/{mine}/commit/main",
                         content="\n".join(json.dumps(x) for x in lines).encode(),
                         headers={"Authorization": f"Bearer {hub_other_token}",
                                  "Content-Type": "application/x-ndjson"})
    # Answered like a blob that does not exist: without access to the gated repo it is not theirs.
    assert answer.status_code == 422 and "does not exist" in answer.json()["error"]
    assert shard.name not in HfApi(token=hub_other_token).list_repo_files(mine)


def test_the_gate_and_the_grants_survive_a_restart(tmp_path):
    tokens = {"hf_own": "owner", "hf_guest": "guest"}
    with LocalHub(tmp_path, tokens=tokens) as hub:
        HfApi(endpoint=hub.endpoint, token="hf_own").create_repo("owner/licensed")
        hub.set_gated("owner/licensed", "auto")
        hub.grant_access("owner/licensed", "guest")
        hub.grant_access("owner/licensed", "someone")
        hub.revoke_access("owner/licensed", "someone")
    with LocalHub(tmp_path, tokens=tokens) as hub:
        assert HfApi(endpoint=hub.endpoint, token=False).model_info("owner/licensed").gated == "auto"
        url = f"{hub.endpoint}/owner/licensed/resolve/main/.gitattributes"
        assert get_hf_file_metadata(url, token="hf_guest").size > 0
        assert hub.context.store.repos[("model", "owner/licensed")].granted == {"guest"}


def test_plan_and_merge_of_a_gated_base_by_id_download_nothing_until_access_is_granted(
        gated, hub_endpoint, hub_other_token, hub_other_user, local_hub, tmp_path):
    ids, _, clean, _ = gated
    base_id = ids[0]
    out = tmp_path / "merged"
    calls = [("plan", lambda token: hf_metagpt.plan(base=base_id, models=ids[1:], output="-", token=token)),
             ("merge", lambda token: hf_metagpt.merge(base=base_id, models=ids[1:], output=str(out), device="cpu",
                                                      progress=False, token=token))]
    for what, call in calls:
        for token, status in [(hub_other_token, 403), (False, 401)]:  # an account without access; no token
            local_hub.clear_requests()
            with pytest.raises(HubAccessError) as err:
                call(token)
            text = str(err.value)
            assert text.startswith(f"{base_id} is gated: its licence must be accepted"), (what, text)
            assert f"{hub_endpoint}/{base_id} (logged in)" in text and "--token, HF_TOKEN" in text
            # Nothing downloaded: the client met the gate on its first file request (a HEAD or a Range
            # read), every request for the base's files was refused, and no file of any input was
            # served after it: not even a safetensors header. The cache holds nothing of the base.
            refused = _file_requests(local_hub.requests, base_id)
            assert refused and {r.status for r in refused} == {status}, (what, refused)
            assert not [r for r in local_hub.requests if "/resolve/" in r.path and (r.status or 200) < 400], what
            assert not _cached_blobs(base_id)
            assert not list(out.glob("*.safetensors"))

    local_hub.grant_access(base_id, hub_other_user)
    try:
        hf_metagpt.merge(base=base_id, models=ids[1:], output=str(out), device="cpu", progress=False,
                         token=hub_other_token, overwrite=True)
    finally:
        local_hub.revoke_access(base_id, hub_other_user)
    assert shards(out) == shards(clean)
    assert _cached_blobs(base_id)
