"""`--device auto` on a machine without an accelerator: the CPU, without importing accelerate."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from hf_metagpt import api
from hf_metagpt.demo.tiny import build_family

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_accelerator() -> bool:
    try:
        return torch.accelerator.current_accelerator(check_available=True) is not None
    except RuntimeError:
        return False


needs_cpu_only = pytest.mark.skipif(_has_accelerator(), reason="this machine has an accelerator")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    return env


@needs_cpu_only
def test_auto_is_the_cpu_without_importing_accelerate():
    code = ("import sys; from hf_metagpt.api import select_device; d = select_device('auto'); "
            "print(d.type, 'accelerate' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["cpu", "False"]


def test_accelerate_still_decides_when_launched_or_a_plugin_is_installed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert api._no_accelerator() is False
    monkeypatch.delenv("WORLD_SIZE")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_xla" else real(name, *a))
    assert api._no_accelerator() is False
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert api._no_accelerator() is (not _has_accelerator())


@needs_cpu_only
def test_cli_merge_with_auto_runs_on_the_cpu_and_equals_device_cpu(tmp_path):
    base, fts = build_family(tmp_path / "m", n_models=2)
    outs = {}
    for device in ("auto", "cpu"):
        out = tmp_path / device
        r = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(base), *map(str, fts),
                            "--output", str(out), "--device", device], env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert " on cpu " in r.stdout + r.stderr
        outs[device] = sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))
    assert outs["auto"] == outs["cpu"] and outs["cpu"]
