"""`hf metagpt ...` through the real hf CLI: the extension manifest and a merge by subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hf_metagpt.demo.tiny import build_family
from reference import assert_within_ulp, load_state, reference_metagpt


def test_hf_metagpt_merge_via_the_hf_cli(tmp_path):
    if shutil.which("hf") is None or shutil.which("hf-metagpt") is None:
        pytest.fail("the hf and hf-metagpt console scripts must be installed (pip install -e .)")
    env = dict(os.environ, HOME=str(tmp_path / "home"), HF_HUB_DISABLE_UPDATE_CHECK="1")
    r = subprocess.run(["hf-metagpt", "install-extension"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "home/.local/share/hf/extensions/hf-metagpt/manifest.json").read_text())
    assert manifest["short_name"] == "metagpt" and Path(manifest["executable_path"]).name == "hf-metagpt"

    base, fts = build_family(tmp_path / "m", n_models=3)
    out = tmp_path / "merged"
    r = subprocess.run(["hf", "metagpt", "merge", "--base", str(base), *map(str, fts), "--output", str(out),
                        "--granularity", "layer"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| layers.3 |" in r.stdout and "peak memory" in r.stdout
    assert "merge" in r.stderr  # the progress bar
    expected, lambdas = reference_metagpt(load_state(base), [load_state(f) for f in fts], "layer")
    got = load_state(out)
    for name, e in expected.items():
        assert_within_ulp(got[name], e, torch.bfloat16)

    # A bad input through the same path: exit 2, one message, no traceback.
    r = subprocess.run(["hf", "metagpt", "merge", "--base", str(base), "--output", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "error: No fine-tuned model given" in r.stderr and "Traceback" not in r.stderr
