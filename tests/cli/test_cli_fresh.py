"""The CLI in a fresh interpreter, as a user runs it: imports, tracebacks and exit codes show here.

In-process tests share one interpreter where everything is imported already; an import race
(`ties` failing with "cannot import name 'AutoModel'") and tracebacks printed by launchers hid
there (issue 13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]

METHODS = ["metagpt", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "metagpt_ties",
           "metagpt_dare", "dare"]


def hf_metagpt_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m hf_metagpt ARGS` in a new interpreter that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def family(tiny_family) -> tuple[Path, list[Path]]:
    return tiny_family(n_models=2)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_from_the_plain_cli(family, tmp_path, method):
    base, fts = family
    out = tmp_path / "merged"
    proc = hf_metagpt_cli("-q", "merge", *map(str, fts), "--base", str(base), "-o", str(out),
                          "--method", method, "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    recorded = json.loads((out / "metagpt_coefficients.json").read_text())["method"]
    assert recorded == ("dare_linear" if method == "dare" else method)


def _clean_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]


def test_malformed_param_value_prints_a_message_not_a_traceback(family, tmp_path):
    base, fts = family
    proc = hf_metagpt_cli("merge", str(fts[0]), "--base", str(base), "-o", str(tmp_path / "o"),
                          "--param", "weights=[0.5,")
    _clean_error(proc, "error: Bad --param value for 'weights': '[0.5,'")
    assert proc.returncode == 2


def test_output_under_a_file_prints_the_path_not_a_traceback(family, tmp_path):
    base, fts = family
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's parent should be\n")
    proc = hf_metagpt_cli("-q", "merge", str(fts[0]), "--base", str(base), "-o", str(blocker / "merged"))
    _clean_error(proc, "error: ")
    assert str(blocker) in proc.stderr
    assert proc.returncode == 2


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent_prints_the_path_not_a_traceback(family, tmp_path):
    base, fts = family
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = hf_metagpt_cli("-q", "merge", str(fts[0]), "--base", str(base), "-o", str(parent / "merged"))
    finally:
        parent.chmod(0o755)
    _clean_error(proc, "error: ")
    assert str(parent) in proc.stderr


@pytest.mark.slow
def test_user_error_under_num_processes_prints_once_without_a_traceback(family, tmp_path):
    base, fts = family
    missing = tmp_path / "no-such-model"
    proc = hf_metagpt_cli("-q", "merge", str(fts[0]), str(missing), "--base", str(base), "-o", str(tmp_path / "o"),
                          "--num-processes", "2", "--device", "cpu", "--max-shard-size", "100KB")
    _clean_error(proc, f"error: Model {str(missing)!r} is neither an existing folder nor a Hub ID.")
    assert proc.returncode == 2
    assert "ChildFailedError" not in proc.stderr and "failed (exitcode" not in proc.stderr


def test_tiny_demo_help_prints_usage_and_creates_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt.demo.tiny", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m hf_metagpt.demo.tiny [-h] [folder]")
    assert list(tmp_path.iterdir()) == []
