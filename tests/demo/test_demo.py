"""The README's main job: `hf-metagpt demo` runs offline, end to end, and ends with a pushed card."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_publishes_merges_by_id_and_pushes_a_card(tmp_path):
    # The demo starts its own local Hub; none of the test session's Hub settings may leak into it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "--quiet", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "base_model_relation: merge" in out
    assert "license:             apache-2.0" in out
    for name in ("base", "chat", "math", "code"):
        assert re.search(rf"demo/tiny-llama-{name}@[0-9a-f]{{40}}", out), name
    card = re.search(r"card:\s+(\S+README\.md)", out).group(1)
    plot = re.search(r"λ plot:\s+(\S+\.png)", out).group(1)
    assert os.path.getsize(plot) > 1000
    for label in ("layer shares plot", "cosines plot"):
        assert os.path.getsize(re.search(rf"{label}:\s+(\S+\.png)", out).group(1)) > 1000
    assert re.search(r"task-vector cosines: 1·2 [+-]0\.\d{3}, 1·3 [+-]0\.\d{3}, 2·3 [+-]0\.\d{3}", out)
    text = open(card).read()
    assert "## Task-vector geometry" in text and "metagpt_layer_shares.png" in text and "metagpt_cosines.png" in text
    assert "base_model_relation: merge" in text and "demo/tiny-llama-code" in text
    assert "hf_demo_" not in proc.stdout + proc.stderr + text  # the demo's token is never shown
    # published, downloaded by ID and pushed through Xet (hf_xet against the local Hub's CAS), not git-LFS
    xet = re.search(r"Xet storage: (\d+) xorbs and (\d+) shards uploaded, (\d+) file reconstructions served", out)
    assert xet and all(int(n) > 0 for n in xet.groups()), out[-500:]
