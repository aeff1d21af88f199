"""Tiny LLaMA families built on the spot: the offline demo, the tests and examples merge these.

A base and fine-tunes that differ from it by amounts that depend on the layer and the task, so
MetaGPT's λ differ from layer to layer — the smallest input that exercises every code path.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_tokenizer(extra_tokens: list[str] | None = None):
    """A character-level fast tokenizer (printable ASCII), built offline with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + list(extra_tokens or []))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


@dataclass
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 128
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.bfloat16
    max_shard_size: str = "100KB"


def tiny_config(spec: TinySpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, vocab_size=spec.vocab_size,
        max_position_embeddings=256, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def task_scale(task: int, name: str) -> float:
    """How far fine-tune `task` (1-based) moves tensor `name`: depends on layer and task."""
    import re

    m = re.search(r"layers\.(\d+)\.", name)
    layer = int(m.group(1)) if m else 7
    return 0.004 * (1 + ((3 * task + 2 * layer) % 5))


def build_family(root: Path, n_models: int = 3, spec: TinySpec | None = None, seed: int = 0,
                 names: list[str] | None = None) -> tuple[Path, list[Path]]:
    """Save a tiny base and `n_models` fine-tunes under `root`; returns their folders."""
    from transformers import LlamaForCausalLM

    spec = spec or TinySpec()
    root = Path(root)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config(spec)).to(spec.dtype)
    tok = tiny_tokenizer()
    base_dir = root / "base"
    save_model(base, tok, base_dir, spec)
    names = names or [f"ft{t}" for t in range(1, n_models + 1)]
    dirs = []
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for t, name in enumerate(names, 1):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        ft = LlamaForCausalLM(tiny_config(spec)).to(spec.dtype)
        with torch.no_grad():
            new = {}
            for k, v in state.items():
                noise = torch.randn(v.shape, generator=gen, dtype=torch.float32) * task_scale(t, k)
                new[k] = (v.float() + noise).to(v.dtype)
            ft.load_state_dict(new, strict=False)
            if spec.tie_word_embeddings:
                ft.tie_weights()
        d = root / name
        save_model(ft, tok, d, spec)
        dirs.append(d)
    return base_dir, dirs


def save_model(model, tok, folder: Path, spec: TinySpec) -> None:
    """A model folder as the Hub has them: weights (sharded as `spec` says), tokenizer, generation config."""
    from transformers import GenerationConfig

    model.save_pretrained(folder, max_shard_size=spec.max_shard_size)
    tok.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_metagpt.demo.tiny [DIR]`: the models recipes/tiny-local.yaml merges."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hf_metagpt.demo.tiny",
        description="Save a tiny LLaMA base and three fine-tunes (chat, math, code) for trying merges offline.")
    parser.add_argument("folder", nargs="?", default="tiny-models",
                        help="where to save them (default: ./tiny-models)")
    args = parser.parse_args(argv)
    base_dir, ft_dirs = build_family(Path(args.folder), names=["chat", "math", "code"])
    print("\n".join(str(p) for p in [base_dir, *ft_dirs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
