"""bench/card_cost.py: times every picture of a Llama-shaped card and leaves the pictures it timed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_card_cost_prints_a_row_per_case_and_keeps_its_pictures(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "card_cost.py"), "--runs", "1",
                           "--cases", "1.1b-layer", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("1.1b-layer")]
    assert len(row) == 1 and re.fullmatch(r"1\.1b-layer(\s+\d+\.\d{3}){5}", row[0]), proc.stdout
    folder = tmp_path / "1.1b-layer"
    card = (folder / "README.md").read_text()
    for name in ("metagpt_lambdas.png", "metagpt_layer_shares.png", "metagpt_cosines.png"):
        assert f"]({name})" in card, name  # the card it timed links every picture
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size[0] >= 900, name
