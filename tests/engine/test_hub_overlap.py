"""The default Hub merge downloads shards on threads while it merges (fetch.OverlappedFiles).

Through the local Hub: the output equals the merge of the local folders, the shards are requested in
the order the merge reads them and merging starts before the last one is in, everything lands in
the Hub cache (a second merge downloads nothing), and a shard that never downloads ends the merge
with the usual clear error, no output and no download thread left behind.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache

import hf_metagpt
import hf_metagpt.engine.fetch as fetch
from hf_metagpt.errors import DownloadStopped, HubUnavailableError
from hf_metagpt.sources.hub_calls import RETRIES
from hf_metagpt.sources.hub_calls import call_until as _call_until
from helpers import publish, shards



pytestmark = pytest.mark.usefixtures("fault_backoff")


@pytest.fixture(scope="module")
def family(tiny_family_merge):
    return tiny_family_merge


def _cached_shards(repo_id: str) -> list[Path]:
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


def _merge(ids: list[str], out: Path, **kw):
    return hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False, **kw)


def _download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hf-metagpt-download")]


class _Recorder:
    """Installs a recording OverlappedFiles: the providers made, the files asked for, in order."""

    def __init__(self, monkeypatch) -> None:
        self.providers: list[fetch.OverlappedFiles] = []
        self.asked: list[tuple[int, str]] = []
        self.first_path_done: list[dict[tuple[int, str], bool]] = []
        rec = self

        class Recording(fetch.OverlappedFiles):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                rec.providers.append(self)

            def path(self, model_index, info, file):
                got = super().path(model_index, info, file)
                if not rec.asked:  # which downloads were finished when the merge read its first file
                    rec.first_path_done.append({k: f.done() for k, f in self._futures.items()})
                rec.asked.append((model_index, file))
                return got

        monkeypatch.setattr(fetch, "OverlappedFiles", Recording)


@pytest.mark.usefixtures("http_only")  # counts each shard's resolve GET (over Xet: reconstructions by hash)
def test_merge_by_id_overlaps_the_download_and_equals_the_local_merge(family, tmp_path, hub_user, hub_faults,
                                                                      monkeypatch):
    folders, expected = family
    ids = publish(folders, hub_user, "ovl")
    rec = _Recorder(monkeypatch)
    n_shards = sum(len(list(f.glob("*.safetensors"))) for f in folders)
    provider_order = fetch.walk_order(hf_metagpt.plan(base=ids[0], models=ids[1:], output="-"))
    assert len(provider_order) == n_shards
    last_repo, last_file = ids[provider_order[-1][0]], provider_order[-1][1]
    # The last shard the merge needs is slow to come: the merge must not wait for it to start.
    slow = hub_faults.inject_fault(rf"^/{last_repo}/resolve/[0-9a-f]{{40}}/{re.escape(last_file)}$", status=None,
                                   delay=1.0, times=1, method="GET")
    hub_faults.clear_requests()
    _merge(ids, tmp_path / "out")
    assert slow.hits == 1
    assert shards(tmp_path / "out") == expected
    [provider] = rec.providers
    assert provider.order == provider_order and provider.downloads == n_shards
    # Queued in the order the merge first reads them: every model's shard of a group before the next group's.
    assert list(dict.fromkeys(rec.asked)) == provider.order
    assert rec.first_path_done[0][provider.order[-1]] is False, "the merge waited for the whole download"
    # One whole GET per shard, at the pinned commit, into the Hub cache; no thread left.
    # this test's repos only: a download thread a test before left running may still log its requests
    gets = [r for r in hub_faults.requests if r.method == "GET" and "/resolve/" in r.path
            and r.path.endswith(".safetensors") and not r.range and r.path.split("/resolve/")[0][1:] in ids]
    assert len(gets) == n_shards and all(re.search(r"/resolve/[0-9a-f]{40}/", r.path) for r in gets)
    for repo, folder in zip(ids, folders):
        assert [p.name for p in _cached_shards(repo)] == sorted(p.name for p in folder.glob("*.safetensors"))
    assert _download_threads() == []

    # A second merge finds every file in the cache: nothing is downloaded, no thread is started.
    hub_faults.clear_requests()
    _merge(ids, tmp_path / "again")
    assert shards(tmp_path / "again") == expected
    assert [r.path for r in hub_faults.requests if "/resolve/" in r.path] == []
    assert rec.providers[1].downloads == 0 and not rec.providers[1]._futures


@pytest.mark.usefixtures("http_only")  # a 5xx on the resolve GET (over Xet: test_xet_errors_are_mapped_to_hub_errors_with_a_hint)
def test_a_shard_that_never_downloads_stops_the_merge_clearly_with_no_output_and_no_threads(
        family, tmp_path, hub_user, hub_faults):
    folders, _ = family
    ids = publish(folders, hub_user, "ovldown")
    shard = sorted(p.name for p in folders[1].glob("*.safetensors"))[1]
    fault = hub_faults.inject_fault(rf"^/{ids[1]}/resolve/[0-9a-f]{{40}}/{re.escape(shard)}$", status=500,
                                    times=None, method="GET")
    out = tmp_path / "out"
    with pytest.raises(HubUnavailableError, match=rf"^{ids[1]}: the Hub kept failing after {RETRIES + 1} attempts "
                                                  rf"\(HTTP 500 on GET /{ids[1]}/resolve/[0-9a-f]{{40}}/"
                                                  rf"{re.escape(shard)}\)"):
        _merge(ids, out)
    assert fault.hits == RETRIES + 1
    assert not out.exists()
    assert _download_threads() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("hf-metagpt")]
    # Once the Hub answers again, the same command completes; shards already in the cache are not fetched again.
    cached = {f"/{repo}/" + p.name for repo in ids for p in _cached_shards(repo)}
    hub_faults.clear_faults()
    hub_faults.clear_requests()
    _merge(ids, out)
    assert out.is_dir()
    refetched = [r.path for r in hub_faults.requests if r.method == "GET" and "/resolve/" in r.path
                 and r.path.endswith(".safetensors") and not r.range]
    assert any(p.startswith(f"/{ids[1]}/") and p.endswith(f"/{shard}") for p in refetched)
    assert not [p for p in refetched if re.sub(r"resolve/[0-9a-f]{40}/", "", p) in cached]


def test_close_cancels_queued_downloads_and_leaves_no_thread(family, hub_user, hub_faults):
    folders, _ = family
    ids = publish(folders, hub_user, "ovlclose")
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    fetch.download(plan, weights=False, weight_index=True)
    hub_faults.inject_fault(r"/resolve/[0-9a-f]{40}/.*\.safetensors$", status=None, delay=0.5, times=None,
                            method="GET")
    files = fetch.OverlappedFiles(plan, workers=2)
    assert len(files._futures) == len(files.order) > 2
    start = time.perf_counter()
    files.close()
    # The two running downloads end (after their 0.5 s delay); the queued ones never start (3 s if they did).
    assert time.perf_counter() - start < 2.0
    assert _download_threads() == []
    assert sum(len(_cached_shards(i)) for i in ids) <= 2
    i, last = files.order[-1]
    with pytest.raises(DownloadStopped):
        files.path(i, plan.inputs[i], last)


@pytest.mark.usefixtures("http_only")  # the HTTP progress hook (over Xet: test_closing_the_downloads_cancels_xet_transfers_within_2_s)
def test_a_stopped_download_ends_mid_file_and_resumes_later(tmp_path, hub_user, hub_faults, monkeypatch):
    """huggingface_hub cannot cancel a download: the progress-bar hook must end it within a chunk."""
    import huggingface_hub.constants as hf_constants

    repo = f"{hub_user}/ovl-bigfile"
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "blob.bin").write_bytes(data)
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=tmp_path / "blob.bin", path_in_repo="blob.bin", repo_id=repo)
    sha = api.model_info(repo).sha
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    stop = threading.Event()
    bar = fetch._stoppable_bar(stop)
    chunks = []

    class StopAfterTwo(bar):  # type: ignore[misc, valid-type]
        def update(self, n=1):
            chunks.append(n)
            if len(chunks) == 2:
                stop.set()
            return super().update(n)

    with pytest.raises(DownloadStopped):
        _call_until(stop, repo, hf_hub_download, repo, "blob.bin", revision=sha, tqdm_class=StopAfterTwo)
    assert len(chunks) == 2  # not the 16 chunks of the whole file
    assert try_to_load_from_cache(repo, "blob.bin", revision=sha) is None
    assert Path(hf_hub_download(repo, "blob.bin", revision=sha)).read_bytes() == data


@pytest.mark.slow
def test_two_processes_download_everything_first_and_give_the_same_bytes(family, tmp_path, hub_user, monkeypatch):
    """Several processes: the main one downloads every file before merging (no provider travels)."""
    import os
    import subprocess
    import sys

    folders, _ = family
    ids = publish(folders, hub_user, "ovl2p")
    one = tmp_path / "one"
    hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(one),
                     max_shard_size="60KB", device="cpu", progress=False)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "hf_metagpt", "-q", "merge", *ids[1:], "--base", ids[0], "-o", str(tmp_path / "two"),
           "--max-shard-size", "60KB", "--device", "cpu", "--num-processes", "2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(shards(one)) >= 4 and shards(tmp_path / "two") == shards(one)
