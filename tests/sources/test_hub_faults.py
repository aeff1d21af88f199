"""Hub faults from the local Hub (5xx, dropped connections, slow answers) during plan, download and push.

Transient faults are retried with backoff (by huggingface_hub itself where it does, by hub_calls.call
and the push loop where it does not) and the merge equals the fault-free one; a fault that never
stops ends with one clear error naming the repo and the request, exit code 2, and nothing
half-published. Backoff delays are shortened with HF_METAGPT_RETRY_BASE.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import hf_metagpt
import hf_metagpt.engine.fetch as fetch
from hf_metagpt.cli import main as cli_main
from hf_metagpt.errors import HubUnavailableError
from hf_metagpt.sources.hub_calls import RETRIES
from helpers import publish, shards



# Faults on the HTTP requests themselves (resolve GETs and their Range reads, git-LFS PUTs, commit
# POSTs counted one per attempt): the HTTP-only path. Over Xet (the default): test_hub_real.py's Xet tests.
pytestmark = pytest.mark.usefixtures("http_only", "fault_backoff")




@pytest.fixture(scope="module")
def family(tiny_family_merge):
    return tiny_family_merge


def _shard_names(folder: Path) -> list[str]:
    return sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())


def _at_download(monkeypatch, inject) -> None:
    """Inject faults once the plan is done, right before the weights are fetched."""
    real = fetch.download

    def download(plan, *args, **kwargs):
        inject()
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(fetch, "download", download)


def _merge(ids, out, **kw):
    return hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False, **kw)


def test_5xx_and_dropped_connections_while_planning_are_retried(family, tmp_path, hub_user, hub_faults):
    folders, expected = family
    ids = publish(folders, hub_user, "plan5xx")
    shard = _shard_names(folders[2])[0]
    # model_info (the pin) is not retried by the client; nor are the Range reads of the headers.
    info_503 = hub_faults.inject_fault(rf"^/api/models/{ids[1]}$", status=503, times=2, method="GET")
    info_drop = hub_faults.inject_fault(rf"^/api/models/{ids[2]}$", drop=True, times=1, method="GET")
    header_500 = hub_faults.inject_fault(rf"^/{ids[2]}/resolve/[0-9a-f]{{40}}/{re.escape(shard)}$", status=500,
                                         times=2, method="GET")
    hub_faults.clear_requests()
    result = _merge(ids, tmp_path / "out")
    assert (info_503.hits, info_drop.hits, header_500.hits) == (2, 1, 2)
    assert shards(tmp_path / "out") == expected
    served = [(r.status, r.range is not None) for r in hub_faults.requests if r.path.endswith(shard) and ids[2] in r.path]
    assert served[:2] == [(500, True), (500, True)] and (206, True) in served[2:]
    assert all(m.sha for m in result.models)


def test_5xx_slow_answers_and_a_connection_cut_mid_download_are_retried_and_resumed(
        family, tmp_path, hub_user, hub_faults, monkeypatch):
    folders, expected = family
    ids = publish(folders, hub_user, "dl5xx")
    chat_shard, math_shard = _shard_names(folders[1])[-1], _shard_names(folders[2])[0]
    size = (folders[1] / chat_shard).stat().st_size
    faults = {}

    def inject():
        # A 5xx on a file's GET is not retried by the client (only 408/429): ours re-runs the download.
        faults["get_500"] = hub_faults.inject_fault(rf"^/{ids[2]}/resolve/[0-9a-f]{{40}}/{re.escape(math_shard)}$",
                                                    status=500, times=2, method="GET")
        # (No tree listing to fail: the side files are fetched by name, hf_hub_download at the pinned commit.)
        # A connection lost mid-body: the client fetches again, with a Range from the last chunk it
        # wrote (its chunks are 10 MB, so for these tiny shards from the start).
        faults["cut"] = hub_faults.inject_fault(rf"^/{ids[1]}/resolve/[0-9a-f]{{40}}/{re.escape(chat_shard)}$",
                                                drop_after=size // 3, times=1, method="GET")
        # Slow but under HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT (10 s): simply waited for.
        faults["slow"] = hub_faults.inject_fault(rf"^/{ids[0]}/resolve/", status=None, delay=0.3, times=3)
        hub_faults.clear_requests()

    _at_download(monkeypatch, inject)
    _merge(ids, tmp_path / "out")
    assert {k: f.hits for k, f in faults.items()} == {"get_500": 2, "cut": 1, "slow": 3}
    assert shards(tmp_path / "out") == expected
    chat_gets = [r for r in hub_faults.requests if r.method == "GET" and r.path.startswith(f"/{ids[1]}/resolve/")
                 and r.path.endswith(f"/{chat_shard}")]
    assert [(r.range, r.status) for r in chat_gets] == [(None, 200), (None, 200)]


def test_5xx_during_push_is_retried_and_lands_as_one_commit(family, tmp_path, hub_user, hub_faults):
    folders, expected = family
    ids = publish(folders, hub_user, "push5xx")
    target = f"{hub_user}/push5xx-merged"
    faults = {
        # Ours: create_repo and the commit POST (the client retries neither).
        "create": hub_faults.inject_fault(r"^/api/repos/create$", status=503, times=2, method="POST"),
        "commit": hub_faults.inject_fault(rf"^/api/models/{target}/commit/", status=500, times=2, method="POST"),
        # The client's own: preupload and the LFS batch (http_backoff, 1 s first delay: once each).
        "preupload": hub_faults.inject_fault(rf"^/api/models/{target}/preupload/", status=502, times=1),
        "lfs": hub_faults.inject_fault(rf"^/{target}\.git/info/lfs/objects/batch$", status=500, times=1),
    }
    result = _merge(ids, tmp_path / "out", push_to=target)
    assert {k: f.hits for k, f in faults.items()} == {"create": 2, "commit": 2, "preupload": 1, "lfs": 1}
    assert result.pushed_url.endswith(target)
    api = HfApi()
    commits = api.list_repo_commits(target)
    assert len(commits) == 2, [c.title for c in commits]  # creation + exactly one upload
    pulled = Path(api.snapshot_download(target, local_dir=tmp_path / "pulled"))
    assert shards(pulled) == expected
    assert (pulled / "README.md").is_file() and (pulled / "metagpt_coefficients.json").is_file()


def test_a_commit_that_never_succeeds_is_a_clear_error_and_publishes_nothing(
        family, tmp_path, hub_user, hub_faults, capsys):
    folders, expected = family
    ids = publish(folders, hub_user, "pushdown")
    target = f"{hub_user}/pushdown-merged"
    api = HfApi()
    api.create_repo(target)
    before = [c.commit_id for c in api.list_repo_commits(target)]
    fault = hub_faults.inject_fault(rf"^/api/models/{target}/commit/", status=503, times=None, method="POST")
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli_main(["merge", "--base", ids[0], *ids[1:], "--output", str(out), "--device", "cpu",
                     "--push-to", target, "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fault.hits == RETRIES + 1
    line = err[err.index("error: "):]
    assert f"error: {target}: the Hub kept failing after {RETRIES + 1} attempts (HTTP 503 on POST " \
           f"/api/models/{target}/commit/main)" in line
    assert "Retry the same command later" in line and "nothing was published" in line
    assert "Traceback" not in err
    assert [c.commit_id for c in api.list_repo_commits(target)] == before  # no new commit
    assert shards(out) == expected  # the local output is complete
    assert (out / "README.md").is_file()


def test_a_download_that_never_succeeds_is_a_clear_error_and_leaves_no_output(
        family, tmp_path, hub_user, hub_faults, capsys, monkeypatch):
    folders, _ = family
    ids = publish(folders, hub_user, "dldown")
    shard = _shard_names(folders[1])[1]
    target = f"{hub_user}/dldown-merged"
    faults = []
    _at_download(monkeypatch, lambda: faults.append(hub_faults.inject_fault(
        rf"^/{ids[1]}/resolve/[0-9a-f]{{40}}/{re.escape(shard)}$", status=500, times=None, method="GET")))
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli_main(["-q", "merge", "--base", ids[0], *ids[1:], "--output", str(out), "--device", "cpu",
                     "--push-to", target])
    err = capsys.readouterr().err
    assert code == 2, err
    assert faults[0].hits == RETRIES + 1
    assert re.search(rf"error: {ids[1]}: the Hub kept failing after {RETRIES + 1} attempts \(HTTP 500 on GET "
                     rf"/{ids[1]}/resolve/[0-9a-f]{{40}}/{re.escape(shard)}\)", err), err
    assert "Retry the same command later" in err and "Traceback" not in err
    assert not out.exists()
    assert not HfApi().repo_exists(target)


def test_plan_gives_up_clearly_when_the_hub_keeps_failing(family, hub_user, hub_faults):
    folders, _ = family
    ids = publish(folders, hub_user, "plandown")
    fault = hub_faults.inject_fault(rf"^/api/models/{ids[0]}$", status=502, times=None)
    with pytest.raises(HubUnavailableError, match=rf"^{ids[0]}: the Hub kept failing after {RETRIES + 1} attempts "
                                                  rf"\(HTTP 502 on GET /api/models/{ids[0]}\)"):
        hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    assert fault.hits == RETRIES + 1
