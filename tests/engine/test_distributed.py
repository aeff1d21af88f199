"""One merge split over two CPU processes (accelerate launch, --num-processes): the same bytes as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import hf_metagpt
from hf_metagpt.engine.distributed import split_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tiny_family):
    base, fts = tiny_family(n_models=3)
    return base.resolve(), [f.resolve() for f in fts]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _merge_args(base: Path, fts: list[Path], granularity: str) -> list[str]:
    # Small shards: six of them, three per process, and blocks straddling two processes' shards.
    return ["merge", *map(str, fts), "--base", str(base), "-o", "merged", "--granularity", granularity,
            "--max-shard-size", "60KB", "--device", "cpu"]


def _single(base: Path, fts: list[Path], granularity: str, where: Path, monkeypatch) -> dict[str, bytes]:
    """The reference: one process, in this one (same relative output name: the card and recipe say it)."""
    where.mkdir()
    monkeypatch.chdir(where)
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output="merged", granularity=granularity,
                     max_shard_size="60KB", device="cpu", progress=False)
    return _files(where / "merged")


def _assert_same(one: dict[str, bytes], two: dict[str, bytes]) -> None:
    assert sorted(one) == sorted(two)
    assert sum(name.endswith(".safetensors") for name in one) >= 4
    for name in one:
        assert one[name] == two[name], f"{name} differs from the single-process merge"


def test_split_shards_contiguous_and_balanced():
    assert split_shards([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert split_shards([10], 2) == [0]
    assert split_shards([100, 1, 1, 1, 100], 2) == [0, 0, 0, 1, 1]
    owners = split_shards([5] * 10, 3)
    assert owners == sorted(owners) and set(owners) == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_accelerate_launch_two_processes_same_bytes(family, tmp_path, monkeypatch, granularity):
    base, fts = family
    one = _single(base, fts, granularity, tmp_path / "one", monkeypatch)
    where = tmp_path / "two"
    where.mkdir()
    # --multi_gpu is accelerate's torchrun launcher (`--cpu` alone starts one process); on CPU the
    # processes connect over gloo (`--device cpu`).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "hf_metagpt", "-q", "--debug",
           *_merge_args(base, fts, granularity)]
    run = subprocess.run(cmd, cwd=where, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # Both processes wrote shards, and only the main one printed the summary.
    assert "process 0 of 2 writes shards [1, 2, 3]" in run.stderr
    assert "process 1 of 2 writes shards [4, 5, 6]" in run.stderr
    assert run.stdout.count("Merged 3 model(s)") == 1
    _assert_same(one, _files(where / "merged"))
    assert [p.name for p in where.iterdir()] == ["merged"], "work folder left behind"


@pytest.mark.slow
@pytest.mark.parametrize("granularity, unit_mb", [("tensor", None), ("model", "0.03")])
def test_num_processes_flag_same_bytes(family, tmp_path, monkeypatch, granularity, unit_mb):
    base, fts = family
    # Tensor granularity: many norm groups, recorded by two processes (and two threads each).
    # Model granularity in small pieces (HF_METAGPT_UNIT_MB): pass 1's norms recorded slab by slab.
    if unit_mb:
        monkeypatch.setenv("HF_METAGPT_UNIT_MB", unit_mb)
    one = _single(base, fts, granularity, tmp_path / "one", monkeypatch)
    where = tmp_path / "two"
    where.mkdir()
    cmd = [sys.executable, "-m", "hf_metagpt", "-q", *_merge_args(base, fts, granularity), "--num-processes", "2"]
    run = subprocess.run(cmd, cwd=where, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("Merged 3 model(s)") == 1
    assert f"granularity {granularity}" in run.stdout
    _assert_same(one, _files(where / "merged"))


@pytest.mark.slow
def test_num_processes_refusal_of_the_main_process_stops_every_process(family, tmp_path):
    """A refusal of the main process (output not empty): one clear error, every process stops."""
    base, fts = family
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("a user's notes\n")
    cmd = [sys.executable, "-m", "hf_metagpt", "-q", *_merge_args(base, fts, "model"), "--num-processes", "2"]
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode != 0
    assert again.stderr.count("is not empty") == 1, again.stderr
    assert _files(tmp_path / "merged") == {"notes.txt": b"a user's notes\n"}
    assert "Traceback" not in again.stderr and "ChildFailedError" not in again.stderr, again.stderr
