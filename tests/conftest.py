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
#   def test_v(http_only): ...    # the HTTP-only path: no Xet on the Hub nor in the client (as HF_HUB_DISABLE_XET=1)
# The Hub stores LFS files in Xet, like huggingface.co for new uploads: the client (with hf_xet,
# installed) uploads through the CAS and downloads through hf_xet, by default in every test and
# subprocess. hf_xet's own retries wait 10 ms first here, not 3 s doubling (a CAS 503 took 163 s).
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
    HF_XET_CLIENT_RETRY_BASE_DELAY="10ms",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_UPDATE_CHECK="1",
    HF_HOME=os.path.join(_hub_tmp, "hf-home"),
    HF_TOKEN=HUB_TOKEN,
)
for _var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET"):
    os.environ.pop(_var, None)

from hf_metagpt.localhub import LocalHub  # noqa: E402  (after the environment, on purpose)

_HUB = LocalHub(os.path.join(_hub_tmp, "hub-data"), port=_hub_port,
                tokens={HUB_TOKEN: HUB_USER, HUB_OTHER_TOKEN: HUB_OTHER_USER}, orgs={HUB_ORG: [HUB_USER]}, xet=True)
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


@pytest.fixture
def fault_backoff(monkeypatch, hub_faults):
    """For the Hub fault tests (autouse in their modules): retries 0.02 s apart, faults removed after."""
    from hf_metagpt.constants import RETRY_BASE_ENV

    monkeypatch.setenv(RETRY_BASE_ENV, "0.02")
    return hub_faults


@pytest.fixture
def http_only(monkeypatch):
    """The HTTP-only path: the Hub serves LFS files itself (no X-Xet-Hash) and the client runs as with
    HF_HUB_DISABLE_XET=1 (uploads by git-LFS basic transfer, downloads by plain GET; subprocesses
    too). Files stay Xet-backed for the tests after: the Hub gives an LFS upload its Xet form on first use."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    xet = _HUB.features.xet
    _HUB.set_storage(xet=False)
    yield _HUB
    _HUB.set_storage(xet=xet)


@pytest.fixture(autouse=True)
def _short_client_commit_backoff(monkeypatch):
    """huggingface_hub's upload pipeline (upload_folder with hf_xet) retries a failed commit POST itself,
    1 s doubling to 8 s: in-process tests wait 10 ms doubling to 20 ms instead (the count is unchanged)."""
    import functools

    import huggingface_hub._commit_api as commit_api

    monkeypatch.setattr(commit_api, "http_backoff",
                        functools.partial(commit_api.http_backoff, base_wait_time=0.01, max_wait_time=0.02))
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
