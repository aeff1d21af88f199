"""GPU vs CPU: the same merge on both devices, compared tensor by tensor in output ulps; timings.

Run on a machine with a CUDA GPU (`--device auto` picks it through accelerate):

    python bench/gpu_check.py [--fixture bench/fixtures/llama-1.1b] [--json out.json]

Prints, for each method and granularity, the largest difference between the CPU and the GPU
output in units in the last place of the output dtype, and (with --fixture) the wall time of a
CPU and a GPU merge of the same inputs. Exits 0: it reports, the tests judge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in ulps between two tensors of the same float dtype (same-sign ordering)."""
    if not a.is_floating_point():
        return 0 if torch.equal(a, b) else 1 << 30
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(ints).long(), b.view(ints).long()
    # Map sign-magnitude bit patterns onto a monotonic integer line.
    bits = 16 if ints is torch.int16 else 32
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def compare_devices(workdir: Path) -> list[dict]:
    import hf_metagpt
    from hf_metagpt.demo.tiny import TinySpec, build_family
    from safetensors.torch import load_file

    base, fts = build_family(workdir / "family", n_models=3,
                             spec=TinySpec(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                           vocab_size=1024, max_shard_size="2MB"))
    rows = []
    for method, granularity, params in [("metagpt", "model", {}), ("metagpt", "layer", {}),
                                        ("task_arithmetic", "model", {"lambda_": 0.5}),
                                        ("ties", "model", {"density": 0.3}),
                                        ("metagpt_ties", "layer", {"density": 0.3})]:
        outs = {}
        for device in ("cpu", "cuda"):
            out = workdir / f"{method}-{granularity}-{device}"
            t = time.perf_counter()
            hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), method=method,
                             parameters=params, granularity=granularity, device=device, progress=False)
            outs[device] = (out, time.perf_counter() - t)
        a = {k: v for f in sorted(outs["cpu"][0].glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted(outs["cuda"][0].glob("*.safetensors")) for k, v in load_file(f).items()}
        worst = max(_ulps(a[k], b[k]) for k in a)
        identical = sum(torch.equal(a[k], b[k]) for k in a)
        rows.append({"method": method, "granularity": granularity, "max_ulps": worst,
                     "identical_tensors": f"{identical}/{len(a)}",
                     "cpu_s": round(outs["cpu"][1], 2), "cuda_s": round(outs["cuda"][1], 2)})
        print(rows[-1], flush=True)
    return rows


def time_fixture(fixture: Path, workdir: Path) -> list[dict]:
    rows = []
    models = [str(p) for p in sorted(fixture.glob("task_*"))]
    for granularity in ("layer", "model"):
        for device in ("cpu", "cuda"):
            out = workdir / f"fx-{granularity}-{device}"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(fixture / "base"),
                                *models, "--output", str(out), "--granularity", granularity, "--device", device],
                               capture_output=True, text=True, cwd=REPO)
            rows.append({"granularity": granularity, "device": device, "wall_s": round(time.perf_counter() - t, 2),
                         "ok": r.returncode == 0, "summary": r.stdout.strip().splitlines()[-1:] or r.stderr[-300:]})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to compare")
        return 0
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "devices": compare_devices(Path(tmp))}
        if args.fixture:
            report["fixture"] = time_fixture(args.fixture, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
