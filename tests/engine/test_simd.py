"""The bytes do not depend on the CPU's vector width: torch dispatches its CPU kernels by what the
CPU has (AVX-512, AVX2, none), and a user's laptop and a many-core server differ there.

Each merge below runs in a fresh interpreter with torch's dispatch forced (`ATEN_CPU_CAPABILITY`,
torch's own switch) and the output files' sha256 are compared with the default dispatch's. On a
machine with AVX-512 this compares AVX-512 against AVX2 kernels (and MKL's instruction sets with
them); on an AVX2 machine both runs take the same kernels, so the test cannot tell them apart there.
Measured on this project's 2-core AVX-512 machine (2026-12-04): all 25 deterministic cases of
tests/methods/test_cuda.py give the same bytes with AVX2 kernels; with torch's scalar kernels (a
CPU without AVX2, none made since 2013) 4 of 25 differ (linear, metagpt_ties), because the vector
kernels add with a fused multiply-add and the scalar ones round twice (docs/hardware.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
#: a case of each kernel and arithmetic: fused weighted sums (model, layer), the method path
#: (TIES, SLERP, Model Stock) and mergekit's op order
CASES = ("metagpt-model", "metagpt-layer", "linear", "task_arithmetic-mergekit", "ties", "metagpt_ties-layer",
         "slerp", "model_stock-mergekit-f32")

CHILD = """
import importlib.util, json, sys, tempfile
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("test_cuda", sys.argv[1])
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
base, fts = Path(sys.argv[2]), [Path(p) for p in sys.argv[3].split(",")]
cases = {c[0]: c for c in tc.DETERMINISTIC_CASES}
out = {}
with tempfile.TemporaryDirectory() as tmp:
    for name in sys.argv[4].split(","):
        out[name] = tc.merge_digest(base, fts, Path(tmp) / name, cases[name], "cpu")
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "digests": out}))
"""


def _digests(family, capability: str | None) -> dict:
    base, fts = family
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    run = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tests" / "methods" / "test_cuda.py"), str(base),
                          ",".join(map(str, fts)), ",".join(CASES)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "methods"))
    try:
        from test_cuda import family as build
    finally:
        sys.path.pop(0)
    return build(tmp_path_factory.mktemp("simd-family"))


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")),
                    reason="a CPU without AVX2: torch's scalar kernels are the only ones here")
def test_avx2_kernels_give_the_default_kernels_bytes(family):
    default = _digests(family, None)
    avx2 = _digests(family, "avx2")
    assert avx2["capability"] == "AVX2" and default["capability"] in ("AVX2", "AVX512")
    assert set(default["digests"]) == set(CASES) and all(default["digests"].values())
    assert avx2["digests"] == default["digests"]
