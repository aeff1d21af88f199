"""Write a synthetic LLaMA-shaped base model and three fine-tunes for benchmarking merges.

The four models are sharded like real Hub checkpoints (``model-0000k-of-0000n.safetensors`` of
about 1 GB plus ``model.safetensors.index.json``) and carry a ``config.json`` that transformers'
``LlamaConfig`` accepts. Each fine-tune is the base plus Gaussian noise whose scale depends on the
layer and on the task, so MetaGPT's per-layer coefficients differ from layer to layer.

Nothing holds a whole model: every shard's header is laid out first, then worker processes (one
per core by default, `--workers N`) generate the tensors, largest first, each tensor of each model
from its own seeded generator, and write them in place: the same bytes whatever the worker count.

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
    # a quick check of the scripts (4 x 26 MB): not a benchmark
    "tiny": Shape(512, 1408, 4, 8, 2, vocab_size=8000),
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


def shard_layout(specs: list[tuple[str, tuple[int, ...], int | None]]) -> list[list[int]]:
    """Tensor indices per shard: save_pretrained's greedy packing (a shard closes before the tensor
    that would take it over SHARD_BYTES)."""
    shards: list[list[int]] = []
    filled = 0
    for i, (_, dims, _) in enumerate(specs):
        nbytes = math.prod(dims) * 2
        if shards and filled and filled + nbytes > SHARD_BYTES:
            shards.append([])
            filled = 0
        if not shards:
            shards.append([])
        shards[-1].append(i)
        filled += nbytes
    return shards


def count_shards(specs: list[tuple[str, tuple[int, ...], int | None]]) -> int:
    """How many ~1 GB shards each model gets (n in 'of-0000n')."""
    return len(shard_layout(specs))


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """A bf16 safetensors header (metadata {"format": "pt"}, tensors in the given order, padded
    with spaces to 8 bytes as safetensors pads it) and each tensor's data offset after it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for name, dims in entries:
        nbytes = math.prod(dims) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _generator(seed: int, tensor: int, model: int) -> torch.Generator:
    """Each (tensor, model) draws from its own seeded generator: the bytes do not depend on which
    worker draws them, or in what order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + tensor) * 8 + model)


def generate(specs, index: int, seed: int, n_layers: int) -> list[torch.Tensor]:
    """The base tensor `index` and its three fine-tuned versions (bf16)."""
    _, dims, layer = specs[index]
    # bf16 randn is about twice as fast as float32 here and the fixture is bf16 anyway.
    base = torch.randn(dims, generator=_generator(seed, index, 0), dtype=torch.bfloat16)
    if len(dims) == 1:  # RMSNorm gains sit around 1, not 0
        base.mul_(0.05).add_(1.0)
    else:
        base.mul_(0.02)
    out = [base]
    for t in range(len(TASKS)):
        noise = torch.randn(dims, generator=_generator(seed, index, t + 1), dtype=torch.bfloat16)
        out.append(noise.mul_(task_scale(t, layer, n_layers)).add_(base))
    return out


# The job, set in each worker by `_init` (and in the parent for one worker).
_JOB: dict = {}


def _init(job: dict) -> None:
    _JOB.update(job)


def _write_tensor(index: int) -> int:
    """Worker: generate tensor `index` for the four models and write each at its place in its shard."""
    torch.set_num_threads(1)
    job = _JOB
    tensors = generate(job["specs"], index, job["seed"], job["n_layers"])
    path_of, offset = job["where"][index]
    for folder, t in zip(job["folders"], tensors):
        fd = os.open(folder / path_of, os.O_WRONLY)
        try:
            view = memoryview(t.view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)
    return index


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def make_fixture(out: Path, size: str = "1.1b", seed: int = 0, overwrite: bool = False,
                 workers: int | None = None, shape: Shape | None = None) -> list[Path]:
    """Writes ``out/base`` and ``out/task_{a,b,c}``; returns the four folders.

    Every shard's header and layout is known before any value is drawn, so the files are created
    at their final size and `workers` processes fill them tensor by tensor (largest first), each
    tensor of each model from its own seeded generator: the bytes are the same for any `workers`.
    """
    import multiprocessing

    shape = shape or SHAPES[size]
    names = ("base",) + TASKS
    folders = [out / n for n in names]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
    specs = tensor_specs(shape)
    layout = shard_layout(specs)
    n_shards = len(layout)
    where: dict[int, tuple[str, int]] = {}
    weight_map: dict[str, str] = {}
    headers = []
    for k, members in enumerate(layout, 1):
        fname = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        head, offsets = safetensors_header([(specs[i][0], specs[i][1]) for i in members])
        headers.append((fname, head, len(head) + sum(math.prod(specs[i][1]) * 2 for i in members)))
        for i, off in zip(members, offsets):
            where[i] = (fname, len(head) + off)
            weight_map[specs[i][0]] = fname
    total = sum(math.prod(d) * 2 for _, d, _ in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    for name, folder in zip(names, folders):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config_json(shape, name), indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, head, size_ in headers:
            with open(folder / fname, "wb") as f:
                f.write(head)
                f.truncate(size_)
    job = dict(specs=specs, seed=seed, n_layers=shape.num_hidden_layers, where=where, folders=folders)
    order = sorted(range(len(specs)), key=lambda i: -math.prod(specs[i][1]))
    n = max(1, min(workers or default_workers(), len(specs)))
    if n == 1:
        threads = torch.get_num_threads()
        _init(job)
        try:
            for i in order:
                _write_tensor(i)
        finally:
            _JOB.clear()
            torch.set_num_threads(threads)
    else:
        # spawn, not fork: a parent that already ran torch's OpenMP threads can hang forked children
        with multiprocessing.get_context("spawn").Pool(n, initializer=_init, initargs=(job,)) as pool:
            for _ in pool.imap_unordered(_write_tensor, order, chunksize=1):
                pass
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="1.1b", help="model shape (default 1.1b)")
    p.add_argument("--out", type=Path, default=None, help="folder (default bench/fixtures/llama-SIZE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing fixture")
    p.add_argument("--workers", type=int, default=None, help="generating processes (default: one per core)")
    args = p.parse_args(argv)
    out = args.out or BENCH_DIR / "fixtures" / f"llama-{args.size}"
    t0 = time.perf_counter()
    folders = make_fixture(out, args.size, args.seed, args.overwrite, args.workers)
    total = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    print(f"wrote {len(folders)} models, {total / 1e9:.2f} GB, to {out} in {time.perf_counter() - t0:.0f} s")
    for d in folders:
        print(f"  {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
