"""`push` renders the card for the repo it pushes to, into the upload only: the local folder is never edited.

Before: `push out me/p08` then `push out me/p09` gave p09 a card titled `# p08` that loaded `me/p08`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download


ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _card(repo: str) -> str:
    return Path(hf_hub_download(repo, "README.md", revision=HfApi().model_info(repo).sha)).read_text()


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family(n_models=2)


def test_each_push_gets_its_own_card_and_the_folder_is_left_as_it_was(family, tmp_path, hub_user):
    base, fts = family
    out = tmp_path / "out"
    proc = cli("merge", "--base", str(base), *map(str, fts), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _digest(out)
    local_card = (out / "README.md").read_text()
    assert "# out\n" in local_card and 'from_pretrained("./out"' in local_card

    for name in ("p08", "p09"):
        proc = cli("push", str(out), f"{hub_user}/{name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _digest(out) == before  # nothing in the output was rewritten
    for name, other in (("p08", "p09"), ("p09", "p08")):
        card = _card(f"{hub_user}/{name}")
        assert f"\n# {name}\n" in card and f'from_pretrained("{hub_user}/{name}"' in card
        assert other not in card and "./out" not in card


def test_a_merge_pushed_with_push_to_can_be_pushed_again_elsewhere(family, tmp_path, hub_user):
    base, fts = family
    out = tmp_path / "merged"
    proc = cli("merge", "--base", str(base), *map(str, fts), "-o", str(out), "--push-to", f"{hub_user}/p10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _digest(out)
    proc = cli("push", str(out), f"{hub_user}/p11")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(out) == before
    card = _card(f"{hub_user}/p11")
    assert "\n# p11\n" in card and f'from_pretrained("{hub_user}/p11"' in card and "p10" not in card
    assert f'from_pretrained("{hub_user}/p10"' in _card(f"{hub_user}/p10")
