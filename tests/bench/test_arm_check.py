"""bench/arm_check.py: its child merges every deterministic case and reports the bytes (run here on the
host interpreter; the aarch64 run needs root, the network and qemu, so it is not part of the suite)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_child_reports_every_case_with_the_bytes_of_an_in_process_merge(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "methods"))
    arm = importlib.import_module("arm_check")
    tc = importlib.import_module("test_cuda")
    base, fts = tc.family(tmp_path / "family")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    got = arm.run_cases([sys.executable], tmp_path / "family", env)
    names = [c[0] for c in tc.DETERMINISTIC_CASES]
    assert list(got["digests"]) == names and all(got["digests"].values())
    case = next(c for c in tc.DETERMINISTIC_CASES if c[0] == "slerp")
    assert got["digests"]["slerp"] == tc.merge_digest(base, fts, tmp_path / "here", case, "cpu")
    assert got["torch"] == __import__("torch").__version__
