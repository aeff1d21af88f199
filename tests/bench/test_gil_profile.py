"""bench/gil_profile.py: py-spy's `--gil` samples summed per role and line, and the step device_check runs."""

from __future__ import annotations

import importlib
import json
import stat
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture()
def gp(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gil_profile")


RAW = [
    "thread (19481): hf-metagpt-merge_0;_worker (concurrent/futures/thread.py:83);run_job (hf_metagpt/engine/merging.py:361) 30",
    "thread (19482): hf-metagpt-merge_11;_worker (concurrent/futures/thread.py:83);run_job (hf_metagpt/engine/merging.py:361) 20",
    "thread (19483): hf-metagpt-write_0;_write (hf_metagpt/engine/writer.py:146) 15",
    "thread (0x7f3a): hf-metagpt-read_2;read_tensors_into (hf_metagpt/engine/reader.py:171) 5",
    "thread (19474): MainThread;main (hf_metagpt/cli.py:690);_cmd_merge (hf_metagpt/cli.py:171) 40",
    "thread (19474): MainThread 10",
    "thread (19478): hf-metagpt-import-plots;<module> (matplotlib/figure.py:1) 25",
    "thread (19490): tqdm_monitor;run (tqdm/_monitor.py:60) 5",
    "thread (19491) 2",
    "thread (19474);_find_and_load (<frozen importlib._bootstrap>:1176) 4",
    "",
]


def test_samples_are_summed_per_role_and_line(gp):
    s = gp.summarize(RAW, rate=100.0, wall=4.0)
    assert s["by_role_s"] == {"main": 0.54, "workers": 0.5, "readers": 0.05, "writer": 0.15, "preload": 0.25,
                              "readahead": 0.0, "other": 0.07}
    assert s["gil_held_s"] == pytest.approx(1.56)
    assert s["gil_share_of_wall"] == pytest.approx(0.39)
    top = s["top_lines"]
    assert top[0] == {"role": "workers", "line": "run_job (hf_metagpt/engine/merging.py:361)", "seconds": 0.5}
    assert top[1] == {"role": "main", "line": "_cmd_merge (hf_metagpt/cli.py:171)", "seconds": 0.4}
    assert {"role": "main", "line": "(no Python frame)", "seconds": 0.1} in top


def test_thread_labels_map_to_roles(gp):
    assert gp.role_of("thread (123): hf-metagpt-merge_7") == "workers"
    assert gp.role_of("thread (0xabc): hf-metagpt-read_0") == "readers"
    assert gp.role_of("thread (9): MainThread") == "main"
    assert gp.role_of("thread (9): hf-metagpt-readahead") == "readahead"
    assert gp.role_of("thread (9): Thread-3 (worker)") == "other"
    assert gp.role_of("thread (9)") == "other"
    assert gp.role_of("thread (9)", {"9": "MainThread"}) == "main"  # named elsewhere in the same profile


def _fake_py_spy(tmp_path: Path) -> Path:
    """A stand-in for py-spy: runs the command after `--` and writes a raw file as py-spy would."""
    exe = tmp_path / "py-spy"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        "a = sys.argv\n"
        "assert a[1:6] == ['record', '--gil', '--nonblocking', '--threads', '-f'], a\n"
        "out = a[a.index('-o') + 1]; rate = int(a[a.index('-r') + 1])\n"
        "code = subprocess.call(a[a.index('--') + 1:])\n"
        "open(out, 'w').write(f'thread (1): MainThread;main (x.py:1) {rate}\\n"
        "thread (2): hf-metagpt-write_0;w (y.py:2) {rate // 2}\\n')\n"
        "sys.exit(code)\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_profile_runs_the_command_and_writes_the_summary(gp, tmp_path):
    exe = _fake_py_spy(tmp_path)
    out = tmp_path / "res" / "gil.json"
    marker = tmp_path / "ran"
    code, summary = gp.profile([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x'); raise SystemExit(3)"],
                               out, rate=50, py_spy=str(exe))
    assert code == 3 and marker.read_text() == "x"
    saved = json.loads(out.read_text())
    assert saved == summary
    assert saved["by_role_s"]["main"] == 1.0 and saved["by_role_s"]["writer"] == 0.5
    assert saved["exit"] == 3 and saved["rate"] == 50


def test_without_py_spy_nothing_runs(gp, tmp_path, monkeypatch):
    monkeypatch.setattr(gp.shutil, "which", lambda name: None)
    monkeypatch.setattr(gp, "REPO_DIR", tmp_path)  # no .whl/ here
    monkeypatch.setattr(gp, "SITE", tmp_path / "site")
    code, summary = gp.profile([sys.executable, "-c", "raise SystemExit(0)"], tmp_path / "g.json")
    assert (code, summary) == (127, None) and not (tmp_path / "g.json").exists()


def test_device_check_profiles_the_warm_cpu_layer_row(gp, tiny_family, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    dc = importlib.import_module("device_check")
    exe = _fake_py_spy(tmp_path)
    monkeypatch.setattr(gp, "find_py_spy", lambda given=None: str(exe))
    base, fts = tiny_family(n_models=2)
    models = [base, *fts]
    inputs = [f for m in models for f in dc.bench.shard_files(m)]
    (tmp_path / "out").mkdir()
    rows = dc.rows_for(models, tmp_path / "out", False, (None, {}, "no mergekit"))
    chk = dc.Check(tmp_path / "results", budget=300)
    line = dc.gil_check(chk, rows, inputs)
    assert line.startswith("GIL (hf-metagpt --device cpu --granularity layer, warm, under py-spy --gil at 100 Hz): held 1.50 s")
    assert "main 1.00, writer 0.50" in line
    recs = [json.loads(x) for x in (chk.out / "device_check.jsonl").read_text().splitlines()]
    gil = [r for r in recs if r.get("kind") == "gil"]
    assert len(gil) == 1 and gil[0]["exit"] == 0 and gil[0]["by_role_s"]["main"] == 1.0
    assert not any((tmp_path / "out").rglob("*.safetensors"))  # the output is cleared after


def test_device_check_profiles_after_the_first_round_before_the_repeats(gp, tiny_family, tmp_path, monkeypatch):
    """The whole script on a tiny family (no CUDA, no mergekit): the GIL profile comes right after the
    first round of rows, so repeats that use up the budget never crowd it out, and it is in the report."""
    monkeypatch.syspath_prepend(str(BENCH))
    dc = importlib.import_module("device_check")
    exe = _fake_py_spy(tmp_path)
    monkeypatch.setattr(gp, "find_py_spy", lambda given=None: str(exe))
    base, fts = tiny_family(n_models=2)
    fixture = tmp_path / "fixture"
    fixture.mkdir()
    (fixture / "base").symlink_to(base)
    for k, ft in enumerate(fts):
        (fixture / f"task_{'ab'[k]}").symlink_to(ft)
    out = tmp_path / "results"
    assert dc.main(["--fixture", str(fixture), "--fixtures-dir", str(tmp_path / "scratch"), "--budget", "400",
                    "--repeat", "2", "--no-mergekit", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "device_check.jsonl").read_text().splitlines()]
    kinds = [(r.get("kind"), r.get("rep")) for r in recs]
    at = kinds.index(("gil", None))
    assert ("floor", 1) in kinds[at:] and ("floor", 1) not in kinds[:at]  # after round 1, before round 2
    assert [r for r in recs[:at] if r.get("kind") == "run" and r.get("mode") == "warm"
            and r.get("row") == "hf-metagpt --device cpu --granularity layer"]  # the first round was complete
    low = [k for k, r in enumerate(recs) if r.get("kind") == "run" and r.get("row", "").endswith("READAHEAD_MB=0")]
    second = kinds.index(("floor", 1))
    assert len(low) == 1 and low[0] > second  # the low-priority rows once, after the second round
    report = (out / "device_check.md").read_text()
    assert "### kernel scaling" in report and (out / "kernel_scaling.json").exists()  # the sweep ran, --small
    assert "GIL (hf-metagpt --device cpu --granularity layer, warm, under py-spy --gil at 100 Hz): held 1.50 s" in report
