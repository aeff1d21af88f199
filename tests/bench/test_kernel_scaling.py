"""bench/kernel_scaling.py: the engine's own jobs on 1–2 threads, their figures, and the bit-identity check."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
ROOT = BENCH.parent


@pytest.fixture()
def ks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("kernel_scaling")


def test_small_sweep_in_a_subprocess(tmp_path):
    out = tmp_path / "ks.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(BENCH / "kernel_scaling.py"), "--small", "--threads", "1,2",
                        "--chunks", "14,18", "--repeat", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["bit_identical"] is True and all(rep["identity"].values())
    assert rep["models"] == 4 and rep["in_bytes"] == 4 * 2 * rep["elements"] and rep["skipped"] == []
    rows = rep["rows"]
    kinds = {(x["kernel"], x["chunk"]) for x in rows}
    assert kinds == {("read", None), ("copy", None), ("gram", 1 << 18), ("gram", 1 << 15), ("weighted_sum", 1 << 14),
                     ("weighted_sum", 1 << 18)}
    assert sorted(x["threads"] for x in rows) == [1] * 6 + [2] * 6
    assert "gram at 2^15: timing only (its float64 sums give other λ bits" in r.stdout
    for x in rows:
        assert x["wall_s"] > 0 and x["in_GBps"] > 0 and x["cpu_s"] >= 0 and len(x["walls"]) == 2
        assert x["in_GBps"] == pytest.approx(rep["in_bytes"] / x["wall_s"] / 1e9, rel=0.01)
        assert x["speedup"] == (1.0 if x["threads"] == 1 else pytest.approx(
            next(y["wall_s"] for y in rows if y["threads"] == 1 and y["kernel"] == x["kernel"]
                 and y["chunk"] == x["chunk"]) / x["wall_s"], abs=0.01))
    assert rep["best"]["threads"] == 2 and rep["best"]["chunk"] in (1 << 14, 1 << 18)
    # the markdown table on stdout: a header and one line per row
    table = [x for x in r.stdout.splitlines() if x.startswith("| weighted_sum | 2^14 |")]
    assert len(table) == 2 and rep["table"] in r.stdout


def test_results_equal_an_independent_float64_computation(ks, tmp_path):
    """The merged bytes and the Gram the sweep reports are the engine's true results on its data."""
    out = tmp_path / "ks.json"
    assert ks.main(["--small", "--threads", "1", "--chunks", "16", "--repeat", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    data = [t.double() for t in ks.make_data(rep["elements"])]
    # Whole tensors in float64, unchunked; `add(alpha=)` as the kernel's own float64 step (torch fuses
    # its multiply-add: `a + m * w` rounds twice and differs where the terms cancel to ~1e-20).
    want = data[0] * rep["coefficients"]["w0"]
    for w, m in zip(rep["coefficients"]["weights"], data[1:]):
        want = want.add(m, alpha=w)
    want = want.to(torch.bfloat16)
    assert rep["weighted_sum_sha256"] == hashlib.sha256(want.view(torch.uint8).numpy().tobytes()).hexdigest()
    taus = [m - data[0] for m in data[1:]]
    gram = [[float(torch.dot(a, b)) for b in taus] for a in taus]
    assert sum(rep["gram"], []) == pytest.approx(sum(gram, []), rel=1e-12)


def test_a_thread_that_changes_one_bit_is_reported(ks, tmp_path, monkeypatch):
    real = ks.run_weighted

    def flaky(pool, raws, out, chunk):
        sums = real(pool, raws, out, chunk)
        if pool.threads > 1:
            out[12345:12346].view(torch.int16).add_(1)
        return sums

    monkeypatch.setattr(ks, "run_weighted", flaky)
    out = tmp_path / "ks.json"
    ks.main(["--small", "--threads", "1,2", "--chunks", "18", "--repeat", "1", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["bit_identical"] is False
    assert rep["identity"] == {"weighted_sum_outputs": False, "weighted_sum_job_sums": True, "gram": True}
    assert "bit-identical to 1 thread" in rep["table"] and ": NO " in rep["table"]


def test_thread_counts_put_one_the_most_and_the_engines_count_first(ks):
    assert ks.thread_counts(None, cores=16) == [1, 16, 12, 2, 4, 8]  # the engine: 16 - 4 readers
    assert ks.thread_counts(None, cores=6) == [1, 6, 5, 2, 4]
    assert ks.thread_counts(None, cores=64) == [1, 32, 2, 4, 8, 12, 16]  # the engine's 32 (MAX_COMPUTE) too
    assert ks.thread_counts(None, cores=2) == [1, 2]
    assert ks.thread_counts(None, cores=1) == [1]
    assert ks.thread_counts("4,2,1") == [1, 4, 2]
