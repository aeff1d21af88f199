"""Time and peak memory of a 3-adapter MetaGPT merge vs a 3-full-fine-tune merge of the same base.

    python bench/lora_vs_full.py [--root DIR] [--hidden 512 --layers 8 --rank 16]
    python bench/lora_vs_full.py --fixture bench/fixtures/llama-1.1b [--rank 16]

With --fixture (a bench/make_fixture.py folder), its base/ and task_*/ are the base and the full
fine-tunes, and the three adapters are built for that base under FIXTURE/lora-rRANK.

Builds (once, under --root) a LLaMA base, three full fine-tunes (tiny.build_family) and three
peft LoRA adapters (rank --rank on every projection, random non-zero B), then runs each merge in
its own process so peak RSS (ru_maxrss) belongs to that merge alone:
  full         3 full fine-tunes -> full model (granularity model: two passes)
  lora         3 adapters        -> full model (norms from r×r Gram matrices; pass 1 reads adapters only)
  lora-out     3 adapters        -> one merged adapter (--output-format lora)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(root: Path, hidden: int, layers: int, rank: int) -> None:
    """A tiny LLaMA family (base + 3 full fine-tunes) and three adapters for its base, under `root`."""
    import torch

    from hf_metagpt.demo.tiny import TinySpec, build_family

    if (root / "ad3" / "adapter_model.safetensors").is_file():
        return
    spec = TinySpec(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=8192,
                    dtype=torch.bfloat16, max_shard_size="200MB")
    base, _ = build_family(root, n_models=3, spec=spec)
    build_adapters(base, root, rank, b_scale=0.01)


def build_adapters(base: Path, root: Path, rank: int, b_scale: float = 0.001) -> None:
    """Three peft LoRA adapters (every projection, random non-zero B) for an existing base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (root / "ad3" / "adapter_model.safetensors").is_file():
        return
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for t in (1, 2, 3):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_scale * t)
        model.save_pretrained(root / f"ad{t}")
        del model


def run_one(root: Path, kind: str, base: Path, fulls: list[Path]) -> dict:
    import hf_metagpt
    from hf_metagpt import api  # noqa: F401  (imports and their peak, before the merge)
    import peft, transformers  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = root / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    models = [str(f) for f in fulls] if kind == "full" else [str(root / f"ad{t}") for t in (1, 2, 3)]
    extra = {"output_format": "lora"} if kind == "lora-out" else {}
    start = time.perf_counter()
    r = hf_metagpt.merge(base=str(base), models=models, output=str(out), device="cpu", progress=False, **extra)
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = sum(f.stat().st_size for m in models for f in Path(m).glob("*.safetensors"))
    return {"kind": kind, "seconds": round(secs, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "rss_after_imports_mb": round(before / 2**20, 1),
            "read_mb": round(r.stats.bytes_read / 2**20, 1), "passes": r.stats.passes,
            "fine_tune_files_mb": round(inputs / 2**20, 1), "written_mb": round(r.stats.bytes_written / 2**20, 1),
            "lambdas": [round(x, 4) for x in r.coefficients["model"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="bench/fixtures/lora-512x8")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fixture", help="a make_fixture.py folder: its base and task_* instead of a tiny family")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fixture:
        fixture = Path(args.fixture)
        base, fulls = fixture / "base", sorted(fixture.glob("task_*"))[:3]
        root = fixture / f"lora-r{args.rank}"
    else:
        root = Path(args.root)
        base, fulls = root / "base", [root / f"ft{t}" for t in (1, 2, 3)]
    if args.one:
        print(json.dumps(run_one(root, args.one, base, fulls)))
        return
    if args.fixture:
        build_adapters(base, root, args.rank)
    else:
        build(root, args.hidden, args.layers, args.rank)
    base_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    print(f"base: {base}, {base_mb:.1f} MB (bf16); adapters rank {args.rank}")
    for _ in range(args.repeat):
        for kind in ("full", "lora", "lora-out"):
            cmd = [sys.executable, __file__, "--root", str(root), "--rank", str(args.rank), "--one", kind]
            if args.fixture:
                cmd += ["--fixture", str(args.fixture)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
