"""Pickle-only inputs (`--allow-pickle`): refused by default, converted safely, merged to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

import hf_metagpt
from hf_metagpt import constants
from hf_metagpt.sources import pickle as pickle_weights
from hf_metagpt.errors import IncompatibleModelsError, InputError
from hf_metagpt.errors import UnsafePickleError
from hf_metagpt.sources.pickle import convert_shard
from hf_metagpt.demo.tiny import TinySpec, build_family

from helpers import run_cli, shards


def pickle_copy(src: Path, dst: Path) -> Path:
    """`src` as a 2023-style repo: the same tensors in `pytorch_model*.bin` (torch.save), no safetensors.

    transformers 5 always writes safetensors, so the old layout is written here: the same shard
    split, `pytorch_model.bin.index.json` naming the `.bin` shards, the other files as they are.
    """
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if not p.name.startswith("model.safetensors") and not p.name.endswith(".safetensors"):
            shutil.copy(p, dst / p.name)
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        names = {f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                 for f in set(index["weight_map"].values())}
        for f, b in names.items():
            torch.save(load_file(src / f), dst / b)
        index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


class Payload:
    """Unpickling this runs `exec` of code that creates `marker`: code that must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


_BUILT: dict[str, tuple] = {}


def _twins(factory, size: str) -> tuple[list[Path], list[Path], Path]:
    """A tiny family in safetensors, its pickle copy, and the merge of the safetensors originals."""
    if size not in _BUILT:
        root = factory.mktemp(f"pickle-{size}")
        base, fts = build_family(root / "st", n_models=2, spec=TinySpec(max_shard_size=size))
        st = [base, *fts]
        pk = [pickle_copy(f, root / "pk" / f.name) for f in st]
        out = root / "merged-st"
        hf_metagpt.merge(base=str(st[0]), models=[str(f) for f in st[1:]], output=str(out), device="cpu",
                         progress=False)
        _BUILT[size] = (st, pk, out)
    return _BUILT[size]


@pytest.fixture(scope="module", params=["100KB", "50MB"], ids=["sharded", "single"])
def twins(request, tmp_path_factory):
    """Both layouts: `pytorch_model-0000k-of-0000n.bin` + index, and a single `pytorch_model.bin`."""
    return _twins(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The sharded layout only (behaviour that does not depend on the layout)."""
    return _twins(tmp_path_factory, "100KB")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "converted"
    monkeypatch.setenv(constants.PICKLE_CACHE_ENV, str(root))
    return root


def test_pickle_only_folder_is_refused_by_default_and_the_message_names_the_flag(sharded, tmp_path, capsys):
    _, pk, _ = sharded
    code, _, err = run_cli(["merge", "--base", str(pk[0]), str(pk[1]), str(pk[2]), "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "only pickle weights (pytorch_model" in err and "--allow-pickle" in err
    assert not (tmp_path / "o").exists()


def test_pickle_copy_merges_to_the_same_bytes_as_its_safetensors_twin(twins, tmp_path, cache, capsys):
    st, pk, merged_st = twins
    out = tmp_path / "merged-pk"
    code, _, err = run_cli(["merge", "--allow-pickle", "--device", "cpu", "--base", str(pk[0]), str(pk[1]),
                            str(pk[2]), "-o", str(out)], capsys)
    assert code == 0, err
    assert shards(out) and shards(out) == shards(merged_st)
    # The converted shards are in the cache, under the SHA-256 of the .bin files, tensor for tensor equal.
    bins = sorted(p.name for p in pk[1].glob("*.bin"))
    key = hashlib.sha256(json.dumps([[f, hashlib.sha256((pk[1] / f).read_bytes()).hexdigest()]
                                     for f in bins]).encode()).hexdigest()
    converted = cache / "sha256" / key
    assert sorted(p.name for p in converted.glob("*.safetensors")) == [b[:-4] + ".safetensors" for b in bins]
    got = {k: v for p in converted.glob("*.safetensors") for k, v in load_file(p).items()}
    want = {k: v for p in st[1].glob("*.safetensors") for k, v in load_file(p).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_converted_shards_are_reused_by_the_next_merge(sharded, tmp_path, cache, monkeypatch):
    _, pk, merged_st = sharded
    calls = []
    real = pickle_weights.convert_shard
    monkeypatch.setattr(pickle_weights, "convert_shard", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    kw = dict(base=str(pk[0]), models=[str(f) for f in pk[1:]], device="cpu", progress=False, allow_pickle=True)
    hf_metagpt.merge(output=str(tmp_path / "a"), **kw)
    n_bins = sum(len(list(f.glob("*.bin"))) for f in pk)
    assert len(calls) == n_bins
    hf_metagpt.merge(output=str(tmp_path / "b"), **kw)
    assert len(calls) == n_bins, "the second merge converted again"
    assert shards(tmp_path / "b") == shards(merged_st)


def test_low_disk_deletes_converted_shards_after_their_last_use(sharded, tmp_path, cache):
    _, pk, merged_st = sharded
    hf_metagpt.merge(base=str(pk[0]), models=[str(f) for f in pk[1:]], output=str(tmp_path / "o"), device="cpu",
                     progress=False, allow_pickle=True, low_disk=True)
    assert shards(tmp_path / "o") == shards(merged_st)
    assert list(cache.rglob("*.safetensors")) == []


def test_plan_takes_names_from_the_bin_index_and_says_shapes_are_checked_later(twins, cache):
    _, pk, _ = twins
    plan = hf_metagpt.plan(base=str(pk[0]), models=[str(f) for f in pk[1:]], output="-", allow_pickle=True)
    text = plan.describe()
    assert "tensor names from pytorch_model.bin.index.json" in text or "a single pytorch_model.bin has no index" in text
    assert "shapes and dtypes are checked after download and conversion" in text
    assert not cache.exists(), "plan converted (or wrote) something"
    index = pk[0] / "pytorch_model.bin.index.json"
    if index.exists():
        assert set(plan.base.tensors) == set(json.loads(index.read_text())["weight_map"])


def test_a_pickle_that_would_run_code_is_refused_and_its_code_never_runs(sharded, tmp_path, cache, capsys):
    _, pk, _ = sharded
    evil = tmp_path / "evil"
    shutil.copytree(pk[2], evil)
    marker = tmp_path / "code-ran"
    victim = sorted(evil.glob("*.bin"))[-1]
    state = torch.load(victim, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, victim)
    code, _, err = run_cli(["merge", "--allow-pickle", "--device", "cpu", "--base", str(pk[0]), str(pk[1]),
                            str(evil), "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    assert f"{victim.name} is a pickle that asks to run code" in err and "refused even with --allow-pickle" in err
    assert "Unsupported global: GLOBAL exec" in err  # the global it asked for
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "o").exists()
    # The same through the conversion function, and for a plain (non-zip) pickle file.
    raw = tmp_path / "raw.bin"
    import pickle

    raw.write_bytes(pickle.dumps({"w": Payload(marker)}))
    with pytest.raises(UnsafePickleError, match="raw.bin is a pickle that asks to run code"):
        convert_shard(raw, tmp_path / "raw.safetensors", model="m", file="raw.bin")
    assert not marker.exists() and not (tmp_path / "raw.safetensors").exists()


def test_shapes_are_checked_after_conversion_before_anything_is_written(sharded, tmp_path, cache):
    _, pk, _ = sharded
    bad = tmp_path / "bad"
    shutil.copytree(pk[1], bad)
    name = "model.layers.1.mlp.down_proj.weight"
    index = bad / "pytorch_model.bin.index.json"
    file = bad / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "pytorch_model.bin")
    state = torch.load(file, weights_only=True)
    state[name] = state[name].t().contiguous()
    torch.save(state, file)
    kw = dict(base=str(pk[0]), models=[str(bad), str(pk[2])], device="cpu", allow_pickle=True)
    hf_metagpt.plan(output="-", **kw)  # provisional shapes: the plan cannot see it yet
    with pytest.raises(IncompatibleModelsError, match=r"Shape mismatch for 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        hf_metagpt.merge(output=str(tmp_path / "o"), progress=False, **kw)
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, f)
    with pytest.raises(InputError, match="rather than a flat dict of tensors"):
        convert_shard(f, tmp_path / "out.safetensors", model="m")


# ---------------------------------------------------------------- the same by Hub ID

@pytest.fixture(scope="module")
def hub_pickles(twins, hub_user):
    _, pk, _ = twins
    api = HfApi()
    ids = []
    tag = os.urandom(3).hex()
    for f in pk:
        repo = f"{hub_user}/pk-{tag}-{f.name}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=f, commit_message="pickle weights")
        ids.append(repo)
    return ids


def _bin_gets(requests) -> list[str]:
    """The .bin downloads: a GET, or over Xet a HEAD answered 302 with the Xet hash (hf_xet then fetches by hash)."""
    return [r.path for r in requests if "/resolve/" in r.path and r.path.endswith(".bin")
            and (r.method == "GET" or (r.method == "HEAD" and r.status == 302))]


def test_hub_pickle_repo_plans_without_downloading_and_merges_to_the_same_bytes(twins, hub_pickles, tmp_path,
                                                                                 cache, local_hub):
    _, _, merged_st = twins
    ids = hub_pickles
    with pytest.raises(InputError, match="--allow-pickle"):
        hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    local_hub.clear_requests()
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-", allow_pickle=True)
    assert _bin_gets(local_hub.requests) == []
    assert "shapes and dtypes are checked after download" in plan.describe()
    from hf_metagpt.engine.fetch import download_bytes

    bins = sum(p.stat().st_size for f in twins[1] for p in f.glob("*.bin"))
    others = sum(p.stat().st_size for f in twins[1] for p in f.iterdir() if p.suffix != ".bin")
    assert bins <= download_bytes(plan)[0] <= bins + others  # the .bin shards are what a merge downloads
    out = tmp_path / "o"
    local_hub.clear_requests()
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False, allow_pickle=True)
    assert shards(out) == shards(merged_st)
    n_bins = len(_bin_gets(local_hub.requests))
    assert n_bins == sum(1 for f in twins[1] for _ in f.glob("*.bin"))
    # Cache keyed by commit: a second merge downloads no .bin, and no .bin is left beside the cache.
    sha = plan.base.ref.sha
    assert (cache / "hub" / ids[0].replace("/", "--") / sha).is_dir()
    assert list(cache.rglob("*.bin")) == []
    local_hub.clear_requests()
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(tmp_path / "again"), device="cpu", progress=False,
                     allow_pickle=True)
    assert _bin_gets(local_hub.requests) == []
    assert shards(tmp_path / "again") == shards(merged_st)


def test_hub_pickle_refusal_points_at_a_safetensors_conversion_pr(sharded, hub_user, tmp_path):
    st, pk, _ = sharded
    api = HfApi()
    repo = f"{hub_user}/pk-pr-{os.urandom(3).hex()}"
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=pk[1], commit_message="pickle weights")
    base_id = f"{hub_user}/pk-pr-base-{os.urandom(3).hex()}"
    api.create_repo(base_id)
    api.upload_folder(repo_id=base_id, folder_path=st[0], commit_message="base")
    # PR 1 adds safetensors weights with other tensor names (not a conversion); PR 2 is one.
    other = tmp_path / "other"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, other / "model.safetensors")
    api.upload_folder(repo_id=repo, folder_path=other, commit_message="unrelated", create_pr=True)
    api.upload_folder(repo_id=repo, folder_path=st[1], commit_message="Adding `safetensors` variant", create_pr=True,
                      allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    with pytest.raises(InputError) as err:
        hf_metagpt.plan(base=base_id, models=[repo], output="-")
    assert f"use {repo}@refs/pr/2 (adds safetensors)" in str(err.value)
    assert "refs/pr/1" not in str(err.value)
    assert "--allow-pickle" in str(err.value)
    # The PR merges to what the safetensors original gives.
    plan = hf_metagpt.plan(base=base_id, models=[f"{repo}@refs/pr/2"], output="-")
    assert plan.models[0].ref.revision == "refs/pr/2" and not plan.models[0].provisional
    # With the flag, the plan converts nothing and says the PR would spare the conversion.
    plan = hf_metagpt.plan(base=base_id, models=[repo], output="-", allow_pickle=True)
    assert f"use {repo}@refs/pr/2 (adds safetensors) to skip the conversion" in plan.describe()


def test_hub_pickle_shards_download_under_one_bar(sharded, hub_user, tmp_path):
    """The CLI draws one "download pickle shards" bar over every `.bin` byte, not a bar per `.bin` file."""
    import re
    import subprocess
    import sys

    _, pk, _ = sharded
    api, tag = HfApi(), os.urandom(3).hex()
    ids = []
    for f in pk:
        repo = f"{hub_user}/pkbar-{tag}-{f.name}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=f, commit_message="pickle weights")
        ids.append(repo)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), TQDM_POSITION="-1",  # huggingface_hub's own bars on, off a terminal
               **{constants.PICKLE_CACHE_ENV: str(tmp_path / "converted")})
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--allow-pickle", "--device", "cpu",
                           "--base", ids[0], *ids[1:], "-o", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bars: dict[str, list[str]] = {}
    for line in re.split(r"[\r\n]", proc.stderr):
        if m := re.match(r"^\s*(?P<desc>.+?):\s+\d+%\|", line):
            bars.setdefault(m["desc"], []).append(line.strip())
    assert not [d for d in bars if ".bin" in d], list(bars)  # no bar per file
    bins = sum(p.stat().st_size for f in pk for p in f.glob("*.bin"))
    assert len(list(pk[0].glob("*.bin"))) > 1
    from tqdm import tqdm

    size = tqdm.format_sizeof(bins)
    assert f"100%|██████████| {size}/{size} [" in bars["download pickle shards"][-1], bars.get("download pickle shards")
