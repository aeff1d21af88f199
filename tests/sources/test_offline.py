"""HF_HUB_OFFLINE=1: merge / plan / inspect by Hub ID run from the Hub cache, or say what is missing.

huggingface_hub reads HF_HUB_OFFLINE when it is imported, so every offline run is a fresh interpreter
(as a user on a cluster runs it), with its own HF_HOME warmed by an online run against the local Hub.
The offline runs point HF_ENDPOINT at a closed port: a request would fail, so none is made.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from hf_metagpt.demo.tiny import build_family

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the socket is


def cli(hf_home: Path, *args: str, offline: bool, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(hf_home))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT=_closed_port())
    else:
        env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def published(tmp_path_factory, hub_user):
    """A tiny base and two fine-tunes on the local Hub, plus a third fine-tune nobody downloads."""
    root = tmp_path_factory.mktemp("offline")
    base, fts = build_family(root, n_models=3)
    api = HfApi()
    ids = []
    for name, folder in zip(["base", "chat", "math", "code"], [base, *fts]):
        repo = f"{hub_user}/offline-{name}"
        api.create_repo(repo, exist_ok=True)
        (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# {name}\n")
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"tiny {name}")
        ids.append(repo)
    shas = {repo: api.model_info(repo).sha for repo in ids}
    return ids, shas


@pytest.fixture(scope="module")
def warm(tmp_path_factory, published):
    """An HF_HOME holding base, chat and math (merged once online); `code` is never downloaded."""
    ids, _ = published
    home = tmp_path_factory.mktemp("warm-home")
    online = tmp_path_factory.mktemp("online") / "merged"
    proc = cli(home, "-q", "merge", "--base", ids[0], ids[1], ids[2], "-o", str(online), "--device", "cpu",
               offline=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home, online


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "OfflineModeIsEnabled" not in proc.stderr, proc.stderr[-3000:]


def test_offline_merge_by_id_runs_from_the_cache_pinned_to_the_cached_commit(published, warm, tmp_path):
    ids, shas = published
    home, online = warm
    out = tmp_path / "merged"
    proc = cli(home, "merge", "--base", ids[0], ids[1], ids[2], "-o", str(out), "--device", "cpu", offline=True)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for repo in ids[:3]:  # says where each input came from
        assert f"{repo}: HF_HUB_OFFLINE is set, using the Hub cache at commit {shas[repo]}" in proc.stderr
    # The same bytes as the online merge, and the coefficients file pins the cached commits.
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == \
        {p.name: p.read_bytes() for p in online.glob("*.safetensors")}
    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert json.dumps(coeffs).count(shas[ids[1]]) >= 1 and json.dumps(coeffs).count(shas[ids[0]]) >= 1
    recipe = (out / "hf_metagpt_recipe.yaml").read_text()
    assert f"{ids[1]}@{shas[ids[1]]}" in recipe
    assert "license: apache-2.0" in (out / "README.md").read_text()  # the inputs' cards came from the cache


@pytest.mark.slow
def test_offline_plan_and_inspect_by_id_run_from_the_cache(published, warm, tmp_path):
    ids, shas = published
    home, _ = warm
    proc = cli(home, "plan", "--base", ids[0], ids[1], ids[2], offline=True)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using the Hub cache at commit {shas[ids[2]]}" in proc.stderr
    proc = cli(home, "inspect", "--base", ids[0], ids[1], ids[2], "--json", offline=True)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [m["sha"] for m in report["inputs"]["models"]] == [shas[ids[1]], shas[ids[2]]]
    assert report["inputs"]["base"]["sha"] == shas[ids[0]]


def test_offline_merge_of_an_uncached_model_names_what_is_missing(published, warm, tmp_path):
    ids, _ = published
    home, _ = warm
    proc = cli(home, "merge", "--base", ids[0], ids[1], ids[3], "-o", str(tmp_path / "o"), "--device", "cpu",
               offline=True)
    _no_traceback(proc)
    assert proc.returncode == 2
    assert f"{ids[3]}: not in the Hub cache and HF_HUB_OFFLINE is set" in proc.stderr
    assert "unset HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_offline_merge_with_only_configs_cached_names_the_missing_weight_files(published, tmp_path):
    """After an online `plan` (headers read remotely, no weights downloaded) the shards are missing."""
    ids, _ = published
    home = tmp_path / "home"
    proc = cli(home, "-q", "plan", "--base", ids[0], ids[1], offline=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli(home, "merge", "--base", ids[0], ids[1], "-o", str(tmp_path / "o"), "--device", "cpu", offline=True)
    _no_traceback(proc)
    assert proc.returncode == 2
    assert f"{ids[0]}: " in proc.stderr and "not in the Hub cache" in proc.stderr
    assert ".safetensors" in proc.stderr  # the missing weight file is named


def test_offline_push_is_refused_before_the_merge_with_what_to_do(tmp_path):
    from hf_metagpt.demo.tiny import build_family

    base, fts = build_family(tmp_path / "fam", n_models=2)
    home = tmp_path / "home"
    proc = cli(home, "merge", "--base", str(base), *map(str, fts), "-o", str(tmp_path / "o"), "--push-to", "me/x",
               offline=True)
    _no_traceback(proc)
    assert proc.returncode == 2
    assert "Pushing to me/x needs the Hub, and HF_HUB_OFFLINE is set." in proc.stderr
    assert "hf-metagpt push DIR REPO" in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was merged
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    proc = cli(home, "push", str(tmp_path / "folder"), "me/x", offline=True)
    _no_traceback(proc)
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr
