"""Shared test fixtures. Each block is owned by one area; append new blocks below the last one."""

# ==== local Hub (issue [local-hub]) ===============================================================
# One session-wide local Hub, started at import time. huggingface_hub reads HF_ENDPOINT once, when
# it is first imported, and importing the hf_metagpt package imports it: so the port is reserved
# and the environment set *before* anything from hf_metagpt or huggingface_hub is imported.
# From any test:
#   def test_x(hub_endpoint, hub_token, hub_user): HfApi().create_repo(f"{hub_user}/x")   # env is set
#   def test_y(local_hub): local_hub.inject_fault(r"/resolve/", status=503)              # faults, request log
#   def test_z(hub_other_token, hub_other_user): HfApi(token=hub_other_token) ...        # a second user
#   def test_w(hub_new_user): token, user = hub_new_user("carol")                          # more users
import atexit
import os
import shutil
import socket
import tempfile

import pytest

HUB_USER, HUB_TOKEN = "tester", "hf_testtoken_tester"
HUB_OTHER_USER, HUB_OTHER_TOKEN = "other", "hf_testtoken_other"
HUB_ORG = "testorg"  # tester is a member; other is not

_hub_tmp = tempfile.mkdtemp(prefix="hf-metagpt-tests-")
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _hub_port = _s.getsockname()[1]
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{_hub_port}",
    HF_HUB_DISABLE_XET="1",  # uploads would otherwise be forced through Xet
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_UPDATE_CHECK="1",
    HF_HOME=os.path.join(_hub_tmp, "hf-home"),
    HF_TOKEN=HUB_TOKEN,
)
os.environ.pop("HF_HUB_OFFLINE", None)

from hf_metagpt.localhub import LocalHub  # noqa: E402  (after the environment, on purpose)

_HUB = LocalHub(os.path.join(_hub_tmp, "hub-data"), port=_hub_port,
                tokens={HUB_TOKEN: HUB_USER, HUB_OTHER_TOKEN: HUB_OTHER_USER}, orgs={HUB_ORG: [HUB_USER]})
_HUB.start()


@atexit.register
def _stop_local_hub() -> None:
    _HUB.stop()
    shutil.rmtree(_hub_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    """The running LocalHub (inject_fault, requests, add_token, ...). Clear what you inject."""
    return _HUB


@pytest.fixture(scope="session")
def hub_endpoint() -> str:
    return _HUB.endpoint


@pytest.fixture(scope="session")
def hub_token() -> str:
    return HUB_TOKEN


@pytest.fixture(scope="session")
def hub_user() -> str:
    return HUB_USER


@pytest.fixture(scope="session")
def hub_other_token() -> str:
    return HUB_OTHER_TOKEN


@pytest.fixture(scope="session")
def hub_other_user() -> str:
    return HUB_OTHER_USER


@pytest.fixture(scope="session")
def hub_new_user():
    """Factory: ``token, user = hub_new_user("carol")`` registers a fresh user on the local Hub."""

    def make(user: str) -> tuple[str, str]:
        token = f"hf_testtoken_{user}"
        _HUB.add_token(token, user)
        return token, user

    return make


@pytest.fixture
def hub_faults():
    """The LocalHub, with every injected fault removed after the test."""
    yield _HUB
    _HUB.clear_faults()
# ==== end of local Hub block ======================================================================


# ==== test speed (issue [seams]) ==================================================================
# No test sleeps through the real retry backoff (1 s doubling to 20 s): retried Hub calls wait
# 0.01 s first. A test that wants other delays sets RETRY_BASE_ENV itself (its setenv wins), and
# subprocesses inherit the setting.
@pytest.fixture(autouse=True)
def _short_retry_backoff(monkeypatch):
    from hf_metagpt.constants import RETRY_BASE_ENV

    monkeypatch.setenv(RETRY_BASE_ENV, "0.01")
# ==== end of test speed block =====================================================================


# ==== test layout (issue [seams]) =================================================================
# Tests live in tests/<package folder>/ (engine, methods, sources, localhub, insight, publish,
# evaluation, mergekit, cli, demo, bench). helpers.py and reference.py stay here, importable from
# every folder (`from helpers import ...`); a test module that reuses another's fixtures or helpers
# imports it by name (`from test_lora import make_adapter`) from any folder: basenames are unique.
import sys as _sys
from pathlib import Path as _Path

for _folder in sorted(_Path(__file__).resolve().parent.iterdir()):
    if _folder.is_dir() and not _folder.name.startswith((".", "_")) and str(_folder) not in _sys.path:
        _sys.path.append(str(_folder))
# ==== end of test layout block ====================================================================


# ==== shared tiny families (issue [seams]) ========================================================
# build_family is deterministic (the same arguments give the same bytes), so the modules that merge
# a plain tiny family share one build per session instead of each building its own. The folders
# are shared: read them, never edit them (a test that edits a model edits a copy: helpers.copy_model).
@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Factory: ``base, fine_tunes = tiny_family(n_models=2)`` (build_family's arguments), built once."""
    from hf_metagpt.demo.tiny import build_family

    built: dict[tuple, tuple] = {}

    def get(n_models: int = 3, spec=None, seed: int = 0, names: list[str] | None = None):
        key = (n_models, repr(spec), seed, tuple(names or ()))
        if key not in built:
            root = tmp_path_factory.mktemp(f"tiny-family-{n_models}")
            built[key] = build_family(root, n_models=n_models, spec=spec, seed=seed, names=names)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_family_merge(tiny_family, tmp_path_factory):
    """([base, ft1, ft2], {shard name: bytes}): the 2-fine-tune family and its default merge of the local
    folders, the reference the Hub tests compare their merges by ID with."""
    import hf_metagpt

    base, fts = tiny_family(n_models=2)
    out = tmp_path_factory.mktemp("tiny-family-merge") / "local-merge"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), device="cpu", progress=False)
    return [base, *fts], {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
# ==== end of shared tiny families block ===========================================================
