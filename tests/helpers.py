"""Small helpers shared by the test files (no merge logic: see reference.py for that)."""

from __future__ import annotations

import shutil
from pathlib import Path

from hf_metagpt.cli import main as cli_main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `hf-metagpt -q ARGS` in-process; (exit code, stdout, stderr) of that run only."""
    capsys.readouterr()  # drop what building the fixtures printed
    code = cli_main(["-q", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder to edit (kept when it exists: module fixtures reuse it)."""
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst
