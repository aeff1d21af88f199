"""HF_METAGPT_MERGE_CHUNK: the CPU weighted sum's chunk is tunable, changes no byte, and a bad value is a clear error."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_metagpt
from hf_metagpt.constants import MERGE_CHUNK_ENV
from hf_metagpt.demo.tiny import TinySpec
from hf_metagpt.engine import kernels
from hf_metagpt.engine.sizing import parse_merge_chunk
from hf_metagpt.errors import MergeError

ROOT = Path(__file__).resolve().parents[2]
#: tensors of 32 Ki and 64 Ki elements: 2^12 cuts each into 8–16 chunks, 2^24 leaves each whole
SPEC = TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=512)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("model*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("text, n", [("4096", 4096), ("65536", 1 << 16), ("2^20", 1 << 20), (" 16777216 ", 1 << 24),
                                     ("", None), (None, None)])
def test_good_values(text, n):
    assert parse_merge_chunk(text) == n


@pytest.mark.parametrize("bad", ["0", "-4096", "2048", "33554432", "65535", "100000", "64k", "2^25", "2^x", "1e5"])
def test_bad_value_names_the_setting_and_the_fix(bad):
    with pytest.raises(MergeError) as exc:
        parse_merge_chunk(bad)
    assert str(exc.value).startswith(f"{MERGE_CHUNK_ENV}={bad!r}: the chunk of the weighted sum must be a power "
                                     "of two from 2^12 (4096) to 2^24 (16777216) elements.")
    assert f"{MERGE_CHUNK_ENV}=65536" in exc.value.hint


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_same_bytes_for_any_chunk_and_the_kernel_gets_it(tiny_family, tmp_path, monkeypatch, granularity):
    base, fts = tiny_family(n_models=3, spec=SPEC)
    seen: list[int | None] = []
    real = kernels.weighted_models

    def spy(*a, **k):
        seen.append(k.get("chunk"))
        return real(*a, **k)

    monkeypatch.setattr(kernels, "weighted_models", spy)
    digests = {}
    for value in (None, "4096", "16384", "16777216"):
        if value is None:
            monkeypatch.delenv(MERGE_CHUNK_ENV, raising=False)
        else:
            monkeypatch.setenv(MERGE_CHUNK_ENV, value)
        seen.clear()
        out = tmp_path / f"c{value}"
        hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), granularity=granularity,
                         device="cpu", progress=False)
        digests[value] = _digest(out)
        assert seen and set(seen) == {int(value) if value else kernels.MERGE_CHUNK}, (value, set(seen))
    assert len(set(digests.values())) == 1, digests


def test_bad_value_stops_an_api_merge(tiny_family, tmp_path, monkeypatch):
    base, fts = tiny_family(n_models=3, spec=SPEC)
    monkeypatch.setenv(MERGE_CHUNK_ENV, "1000")
    with pytest.raises(MergeError, match=r"HF_METAGPT_MERGE_CHUNK='1000': .* power of two"):
        hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(tmp_path / "o"), device="cpu",
                         progress=False)
    assert not list(tmp_path.glob("o/*.safetensors"))  # stopped before any output was written


def test_cli_bad_value_is_a_clear_error_and_a_good_one_merges(tiny_family, tmp_path):
    base, fts = tiny_family(n_models=3, spec=SPEC)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(base), *map(str, fts), "--device", "cpu"]
    bad = subprocess.run(cmd + ["--output", str(tmp_path / "bad")], capture_output=True, text=True,
                         env={**env, MERGE_CHUNK_ENV: "3000"})
    assert bad.returncode != 0
    assert "HF_METAGPT_MERGE_CHUNK='3000': the chunk of the weighted sum must be a power of two" in bad.stderr
    assert "HF_METAGPT_MERGE_CHUNK=65536" in bad.stderr and "Traceback" not in bad.stderr
    outs = {}
    for value in ("4096", "262144"):
        r = subprocess.run(cmd + ["--output", str(tmp_path / value)], capture_output=True, text=True,
                           env={**env, MERGE_CHUNK_ENV: value})
        assert r.returncode == 0, r.stderr
        outs[value] = _digest(tmp_path / value)
    assert outs["4096"] == outs["262144"]
