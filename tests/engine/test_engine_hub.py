"""[engine] by Hub ID: one way out for every thread (an error does not wait for downloads in flight),
and the push checked before the merge and built in a stable, resumable folder."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants

import hf_metagpt
from hf_metagpt.errors import HubAccessError

from helpers import publish, shards


@pytest.fixture(scope="module")
def family(tiny_family):
    base, fts = tiny_family(n_models=2)
    return [base, *fts]


def _merge(ids: list[str], out: Path | None, **kw):
    return hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out) if out else None, device="cpu",
                            progress=False, max_shard_size="60KB", **kw)


@pytest.mark.usefixtures("http_only")  # a 403 on the resolve GET (over Xet: test_xet_errors_are_mapped_to_hub_errors_with_a_hint)
def test_a_403_on_one_shard_ends_the_merge_at_once_saying_access_denied(family, tmp_path, hub_user, hub_faults,
                                                                       monkeypatch):
    from hf_metagpt.engine import fetch

    ids = publish(family, hub_user, "e403")
    shard = sorted(p.name for p in family[1].glob("*.safetensors"))[0]  # among the first downloads
    real_init = fetch.OverlappedFiles.__init__

    def faults_once_planned(self, *args, **kwargs):
        # Once the plan is made (its header reads done): every other shard answers only after
        # 20 s, and this one is refused after 2 s.
        hub_faults.inject_fault(rf"^/{ids[1]}/resolve/[0-9a-f]{{40}}/{re.escape(shard)}$", status=403,
                                times=None, delay=2.0, method="GET")
        hub_faults.inject_fault(r"/resolve/[0-9a-f]{40}/model-.*\.safetensors$", status=None, times=None,
                                delay=20.0, method="GET")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(fetch.OverlappedFiles, "__init__", faults_once_planned)
    start = time.monotonic()
    with pytest.raises(HubAccessError, match=r"access denied \(HTTP 403\)"):
        _merge(ids, tmp_path / "out")
    took = time.monotonic() - start
    assert took < 12, f"the merge waited {took:.1f} s for downloads in flight"
    assert not (tmp_path / "out").exists()


def test_push_to_a_namespace_the_token_cannot_write_is_refused_before_any_download(family, tmp_path, hub_user,
                                                                                   hub_other_user, local_hub):
    ids = publish(family, hub_user, "eperm")
    local_hub.clear_requests()
    with pytest.raises(HubAccessError, match=rf"cannot create a repo in '{hub_other_user}'"):
        _merge(ids, tmp_path / "out", push_to=f"{hub_other_user}/stolen")
    assert not [r for r in local_hub.requests if r.method == "GET" and r.path.endswith(".safetensors") and not r.range]
    assert not (tmp_path / ".out.hf-metagpt-partial").exists()


def test_push_without_output_builds_in_a_stable_folder_and_removes_it_after_the_push(family, tmp_path, hub_user,
                                                                                     hub_faults):
    ids = publish(family, hub_user, "estable")
    repo = f"{hub_user}/estable-merged"
    folder = Path(constants.HF_HOME) / "hf-metagpt" / "push" / repo.replace("/", "--")
    # The commit fails every time: the merge stays in the stable folder (nothing lost) ...
    hub_faults.inject_fault(rf"^/api/models/{repo}/commit/", status=500, times=None, method="POST")
    with pytest.raises(hf_metagpt.MergeError):
        _merge(ids, None, push_to=repo)
    assert (folder / "model.safetensors.index.json").is_file()
    kept = shards(folder)
    hub_faults.clear_faults()
    # ... and the same command reuses it (no pass 1, nothing rewritten), pushes, then removes it.
    result = _merge(ids, None, push_to=repo)
    assert result.stats.passes == 1 and result.output is None
    assert not folder.exists()
    files = set(HfApi().list_repo_files(repo))
    assert set(kept) <= files and "README.md" in files
    card = HfApi().hf_hub_download(repo, "README.md") if hasattr(HfApi, "hf_hub_download") else None
    if card:
        assert str(constants.HF_HOME) not in Path(card).read_text()
