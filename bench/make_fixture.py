"""Write a synthetic LLaMA-shaped base model and three fine-tunes for benchmarking merges.

The four models are sharded like real Hub checkpoints (``model-0000k-of-0000n.safetensors`` of
about 1 GB plus ``model.safetensors.index.json``) and carry a ``config.json`` that transformers'
``LlamaConfig`` accepts. Each fine-tune is the base plus Gaussian noise whose scale depends on the
layer and on the task, so MetaGPT's per-layer coefficients differ from layer to layer.

Nothing holds a whole model: tensors are generated one at a time (the base tensor and its three
fine-tuned versions together) and each model's shard is written as soon as it fills.

    python bench/make_fixture.py                    # TinyLlama-1.1B shape, 4 x 2.2 GB
    python bench/make_fixture.py --size 3b --out bench/fixtures/llama-3b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

BENCH_DIR = Path(__file__).resolve().parent
SHARD_BYTES = 1_000_000_000  # like save_pretrained(max_shard_size="1GB")
TASKS = ("task_a", "task_b", "task_c")


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of a LLaMA checkpoint, named as in LlamaConfig."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads


SHAPES = {
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "1.1b": Shape(2048, 5632, 22, 32, 4),
    # openlm-research/open_llama_3b
    "3b": Shape(3200, 8640, 26, 32, 32),
    # meta-llama/Llama-2-7b-hf
    "7b": Shape(4096, 11008, 32, 32, 32, max_position_embeddings=4096),
}


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, layer index or None) for every tensor, in save_pretrained's order."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    specs: list[tuple[str, tuple[int, ...], int | None]] = [
        ("model.embed_tokens.weight", (shape.vocab_size, h), None)
    ]
    for n in range(shape.num_hidden_layers):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), n),
            (p + "self_attn.k_proj.weight", (kv, h), n),
            (p + "self_attn.v_proj.weight", (kv, h), n),
            (p + "self_attn.o_proj.weight", (h, h), n),
            (p + "mlp.gate_proj.weight", (i, h), n),
            (p + "mlp.up_proj.weight", (i, h), n),
            (p + "mlp.down_proj.weight", (h, i), n),
            (p + "input_layernorm.weight", (h,), n),
            (p + "post_attention_layernorm.weight", (h,), n),
        ]
    specs += [("model.norm.weight", (h,), None), ("lm_head.weight", (shape.vocab_size, h), None)]
    return specs


def task_scale(task: int, layer: int | None, n_layers: int) -> float:
    """Standard deviation of task ``task``'s update at ``layer`` (None: embeddings/head/final norm).

    Three different depth profiles, so that each task dominates a different part of the network
    and MetaGPT's per-layer lambdas are far from 1/3.
    """
    if layer is None:
        return (0.8e-3, 1.6e-3, 0.4e-3)[task]
    x = layer / max(n_layers - 1, 1)  # 0 at the first layer, 1 at the last
    profile = (
        0.3 + 1.7 * x,  # grows with depth
        2.0 - 1.7 * x,  # shrinks with depth
        0.3 + 1.7 * math.exp(-((x - 0.5) ** 2) / 0.02),  # peaks in the middle
    )[task]
    return 1e-3 * profile


def config_json(shape: Shape, name: str) -> dict:
    return {
        "_name_or_path": name,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048, "pad_token_id": 0}


class ShardWriter:
    """Collects one model's tensors and writes a ~1 GB shard whenever the next would overflow."""

    def __init__(self, folder: Path, n_shards: int):
        self.folder, self.n_shards = folder, n_shards
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > SHARD_BYTES:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        self.shard += 1
        fname = f"model-{self.shard:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        for k in self.pending:
            self.weight_map[k] = fname
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        assert self.shard == self.n_shards, (self.shard, self.n_shards)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def count_shards(specs: list[tuple[str, tuple[int, ...], int | None]]) -> int:
    """Replays ShardWriter's packing to know n in 'of-0000n' before writing the first shard."""
    n, filled = 0, 0
    for _, dims, _ in specs:
        nbytes = math.prod(dims) * 2
        if filled and filled + nbytes > SHARD_BYTES:
            n, filled = n + 1, 0
        filled += nbytes
    return n + (1 if filled else 0)


def make_fixture(out: Path, size: str = "1.1b", seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Writes ``out/base`` and ``out/task_{a,b,c}``; returns the four folders."""
    shape = SHAPES[size]
    names = ("base",) + TASKS
    folders = [out / n for n in names]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
    specs = tensor_specs(shape)
    n_shards = count_shards(specs)
    writers = []
    for name, folder in zip(names, folders):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config_json(shape, name), indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        writers.append(ShardWriter(folder, n_shards))

    gen = torch.Generator().manual_seed(seed)
    for name, dims, layer in specs:
        # bf16 randn is about twice as fast as float32 here and the fixture is bf16 anyway.
        if len(dims) == 1:  # RMSNorm gains sit around 1, not 0
            base = torch.randn(dims, generator=gen, dtype=torch.bfloat16).mul_(0.05).add_(1.0)
        else:
            base = torch.randn(dims, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        writers[0].add(name, base)
        for t in range(len(TASKS)):
            noise = torch.randn(dims, generator=gen, dtype=torch.bfloat16)
            writers[t + 1].add(name, noise.mul_(task_scale(t, layer, shape.num_hidden_layers)).add_(base))
    for w in writers:
        w.finish()
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="1.1b", help="model shape (default 1.1b)")
    p.add_argument("--out", type=Path, default=None, help="folder (default bench/fixtures/llama-SIZE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing fixture")
    args = p.parse_args(argv)
    out = args.out or BENCH_DIR / "fixtures" / f"llama-{args.size}"
    t0 = time.perf_counter()
    folders = make_fixture(out, args.size, args.seed, args.overwrite)
    total = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    print(f"wrote {len(folders)} models, {total / 1e9:.2f} GB, to {out} in {time.perf_counter() - t0:.0f} s")
    for d in folders:
        print(f"  {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
