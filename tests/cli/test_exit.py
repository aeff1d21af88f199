"""The CLI's exit (`cli.exit_now`): atexit handlers and flushed output as at a normal exit, no teardown —
unless a non-daemon thread still runs, which the normal exit then joins. Fresh interpreters only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

# A process that runs the CLI as the `hf-metagpt` script does (cli.entry), with two witnesses: an
# atexit handler (must run) and an object whose finalizer runs only in the interpreter's teardown
# (must not, on the fast path).
PROLOGUE = """
import atexit, sys, threading, time
mark = sys.argv.pop(1)
atexit.register(lambda: open(mark + '.atexit', 'w').write('ran'))
class Witness:
    def __del__(self, _open=open, _path=mark + '.teardown'):  # bound now: builtins may be gone by then
        _open(_path, 'w').write('ran')
witness = Witness()
"""


def _run(tmp_path: Path, argv: list[str], extra: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    mark = tmp_path / "mark"
    code = PROLOGUE + extra + "\nfrom hf_metagpt.cli import entry\nsys.argv[0] = 'hf-metagpt'\nentry()\n"
    proc = subprocess.run([sys.executable, "-c", code, str(mark), *argv], capture_output=True, text=True, timeout=300)
    return proc, mark


def test_a_merge_ends_without_teardown_and_keeps_its_output_logs_and_exit_handlers(tiny_family, tmp_path):
    base, fts = tiny_family(n_models=2)
    out = tmp_path / "out"
    proc, mark = _run(tmp_path, ["merge", "--base", str(base), *map(str, fts), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert Path(str(mark) + ".atexit").read_text() == "ran"
    assert not Path(str(mark) + ".teardown").exists()  # the interpreter's teardown was skipped
    # stdout was a pipe (block-buffered): its last line, the summary, was flushed before the exit
    assert proc.stdout.rstrip().splitlines()[-1].startswith("time ")
    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert len(coeffs["models"]) == 2
    shards = sorted(out.glob("*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), "pt") as f:  # a complete safetensors file, readable
        assert list(f.keys())


def test_a_refusal_keeps_its_message_and_exit_status(tmp_path):
    proc, mark = _run(tmp_path, ["merge", "--base", str(tmp_path / "missing"), str(tmp_path / "also-missing")])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert Path(str(mark) + ".atexit").read_text() == "ran"
    assert not Path(str(mark) + ".teardown").exists()


def test_a_thread_still_running_is_joined_by_the_normal_exit(tmp_path):
    late = tmp_path / "late"
    extra = (f"def work():\n    time.sleep(0.5)\n    open({str(late)!r}, 'w').write('done')\n"
             "threading.Thread(target=work).start()\n")
    proc, mark = _run(tmp_path, ["--version"], extra)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert late.read_text() == "done"  # not killed: joined
    assert Path(str(mark) + ".atexit").read_text() == "ran"
    assert Path(str(mark) + ".teardown").read_text() == "ran"  # the normal exit, teardown included


def test_python_dash_m_exits_the_same_way(tmp_path):
    argv = ["merge", "--base", str(tmp_path / "missing"), str(tmp_path / "also-missing")]
    mark = tmp_path / "mark"
    code = (PROLOGUE + "\nimport runpy\nsys.argv = ['hf_metagpt', *sys.argv[1:]]\n"
            "runpy.run_module('hf_metagpt', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(mark), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert Path(str(mark) + ".atexit").read_text() == "ran"
    assert not Path(str(mark) + ".teardown").exists()
