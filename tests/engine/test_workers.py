"""Worker sizing (engine/sizing.py) and bytes that never depend on the number of workers or threads."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.engine import merging
from hf_metagpt.constants import WORKERS_ENV
from hf_metagpt.engine.sizing import GPU_TORCH_THREADS, WORKER_BYTES, parse_override, plan_workers
from hf_metagpt.errors import MergeError
from hf_metagpt.methods import sparsify
from hf_metagpt.methods.interpolation import ModelStock, slerp

GB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the pure function


@pytest.mark.parametrize("cores, free, device, override, threaded, processes, expect", [
    (1, 8 * GB, "cpu", None, True, 1, (1, 1, 1, 1)),
    (2, 8 * GB, "cpu", None, True, 1, (1, 2, 1, 1)),      # unchanged on two cores
    (3, 8 * GB, "cpu", None, True, 1, (1, 2, 1, 1)),
    (16, 8 * GB, "cpu", None, True, 1, (4, 12, 1, 1)),    # four readers, the rest compute
    (64, 64 * GB, "cpu", None, True, 1, (4, 32, 1, 1)),   # MAX_COMPUTE
    (16, 3 * WORKER_BYTES, "cpu", None, True, 1, (4, 3, 1, 1)),  # what free memory holds
    (16, 8 * GB, "cpu", None, True, 4, (1, 3, 1, 1)),     # four processes share 16 cores
    (2, 8 * GB, "cpu", None, True, 2, (1, 1, 1, 1)),
    (16, 8 * GB, "cpu", None, False, 1, (4, 1, 1, None)),  # the method path: torch's own threads
    (16, 8 * GB, "cuda", None, True, 1, (4, 1, 1, GPU_TORCH_THREADS)),
    (16, 8 * GB, "cuda", None, False, 1, (4, 1, 1, GPU_TORCH_THREADS)),
    (1, 8 * GB, "cuda", None, True, 1, (1, 1, 1, 1)),
    (2, 8 * GB, "cpu", 8, True, 1, (1, 8, 1, 1)),         # an override is taken as given
    (64, 64 * GB, "cpu", 1, True, 1, (1, 1, 1, 1)),
    (16, 8 * GB, "cpu", 4, False, 1, (1, 1, 1, None)),
])
def test_plan_workers(cores, free, device, override, threaded, processes, expect):
    p = plan_workers(cores, free, device, override, threaded=threaded, processes=processes)
    assert (p.readers, p.compute, p.writers, p.torch_threads) == expect
    assert p.source == ("override" if override else "auto")


@pytest.mark.parametrize("bad", ["0", "-2", "two", "2.5", "1e3", " "])
def test_bad_override_is_a_clear_error(bad):
    with pytest.raises(MergeError, match="must be a whole number ≥ 1") as exc:
        parse_override(bad, "--workers")
    assert "--workers" in str(exc.value) and WORKERS_ENV in exc.value.hint


def test_override_values():
    assert parse_override(None) is None and parse_override("") is None
    assert parse_override("3") == 3 and parse_override(8) == 8


def test_compute_workers_follows_the_environment(monkeypatch):
    for n in (1, 2, 3, 8):
        monkeypatch.setenv(WORKERS_ENV, str(n))
        assert merging.compute_workers(merging.FusedKernel, torch.device("cpu")) == n
        assert merging.compute_workers(merging.MethodKernel, torch.device("cpu")) == 1
    monkeypatch.setenv(WORKERS_ENV, "zero")
    with pytest.raises(MergeError, match="HF_METAGPT_WORKERS='zero'"):
        merging.compute_workers(merging.FusedKernel, torch.device("cpu"))


# --------------------------------------------------------------------------- same bytes for any count


def _digest(folder: Path) -> str:
    """sha256 of the weights (model*.safetensors; the metagpt_gram.safetensors side file's header
    lists its metadata in a varying order from run to run, whatever the worker count)."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("model*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from hf_metagpt.demo.tiny import TinySpec, build_family

    return build_family(tmp_path_factory.mktemp("workers"), n_models=3,
                        spec=TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=512))


@pytest.mark.parametrize("method, granularity, params, unit_mb", [
    ("metagpt", "model", {}, None),
    ("metagpt", "layer", {}, "0.05"),          # row slabs of tensors
    ("task_arithmetic", "model", {"lambda_": 0.7}, None),
])
def test_bytes_do_not_depend_on_the_worker_count(family, tmp_path, monkeypatch, method, granularity, params, unit_mb):
    base, fts = family
    # Jobs of 3 000 elements: every tensor is cut into several jobs, shared by the workers, and
    # their float64 Gram sums are added in job order whatever thread finished first.
    monkeypatch.setattr(merging, "JOB", 3000)
    if unit_mb:
        monkeypatch.setenv("HF_METAGPT_UNIT_MB", unit_mb)
    digests, lambdas = {}, {}
    for n in (1, 2, 3, 8):
        monkeypatch.setenv(WORKERS_ENV, str(n))
        out = tmp_path / f"w{n}"
        res = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), method=method,
                               parameters=params, granularity=granularity, device="cpu", progress=False)
        digests[n] = _digest(out)
        lambdas[n] = res.coefficients
    assert len(set(digests.values())) == 1, digests
    assert all(lambdas[n] == lambdas[1] for n in lambdas)


def test_method_reductions_do_not_depend_on_torch_threads():
    g = torch.Generator().manual_seed(0)
    n = 2_000_003
    base = torch.randn(n, generator=g)
    taus = [torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 6 * 1e-2 for _ in range(3)]
    threads = torch.get_num_threads()
    results, plain = {}, {}
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            plain[k] = [float(t.sum()) for t in taus] + [float(t.abs().sum()) for t in taus]
            results[k] = (sparsify.magnitude(taus[0], 0.3, rescale=True),
                          slerp(0.3, base, base + taus[0]),
                          ModelStock().combine(base.clone(), [t.clone() for t in taus], [1 / 3] * 3, None))
    finally:
        torch.set_num_threads(threads)
    assert plain[1] != plain[3]  # plain float32 sums do depend on the thread count
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[3]))


@pytest.mark.slow
def test_cli_workers(family, tmp_path):
    base, fts = family
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(WORKERS_ENV, None)
    cmd = [sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(base), *map(str, fts), "--device", "cpu"]
    bad = subprocess.run(cmd + ["--output", str(tmp_path / "bad"), "--workers", "0"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode != 0
    assert "--workers='0': the number of compute workers must be a whole number ≥ 1" in bad.stderr
    assert "Traceback" not in bad.stderr
    outs = {}
    for n in ("1", "3"):
        r = subprocess.run(cmd + ["--output", str(tmp_path / n), "--workers", n], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, r.stderr
        outs[n] = _digest(tmp_path / n)
        # the summary says where it ran, on how many threads, and how fast it read and wrote
        line = next(x for x in r.stdout.splitlines() if x.startswith("time "))
        assert f" on cpu ({n} compute thread(s), 1 reader(s)), read " in line
        read_gb, read_rate = (float(x) for x in re.search(r"read ([0-9.]+) GB in 2 pass\(es\) \(([0-9.]+) GB/s\)",
                                                            line).groups())
        assert read_gb > 0 and read_rate > 0
        assert re.search(r"wrote [0-9.]+ GB \([0-9.]+ GB/s\)", line)
    assert outs["1"] == outs["3"]


@pytest.mark.parametrize("granularity, unit_mb", [("model", None), ("layer", "0.05")])
def test_bytes_do_not_depend_on_the_reader_count(family, tmp_path, monkeypatch, granularity, unit_mb):
    """Readers fill each input's own place in the pooled buffer: 1 or 4 of them read the same pieces."""
    from hf_metagpt.engine import feed as feed_mod
    from hf_metagpt.engine import sizing

    base, fts = family
    if unit_mb:
        monkeypatch.setenv("HF_METAGPT_UNIT_MB", unit_mb)
    used = []
    real_init = feed_mod.PieceFeed.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        used.append(self.readers)

    monkeypatch.setattr(feed_mod.PieceFeed, "__init__", spy)
    digests = {}
    for n in (1, 4):
        monkeypatch.setattr(sizing, "readers", lambda device, processes=1, n=n: n)
        out = tmp_path / f"r{n}"
        hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), granularity=granularity,
                         device="cpu", progress=False)
        digests[n] = _digest(out)
    assert used == [1, 4]
    assert digests[1] == digests[4]


def test_readers_from_the_machine():
    assert [plan_workers(c, 64 * GB, "cpu").readers for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    assert plan_workers(16, 64 * GB, "cpu").compute == 12  # 16 cores: 4 readers, 12 compute workers
    assert plan_workers(16, 64 * GB, "cuda").readers == 4
    assert plan_workers(16, 64 * GB, "cpu", 3).readers == 1
