"""Tiny *trained* models on synthetic tasks, so that `hf-metagpt compare` shows a meaningful table offline.

`python -m hf_metagpt.demo.tiny_tasks DIR` writes (well under a minute of CPU):

    DIR/base/                 a tiny LLaMA (char tokenizer) pre-trained on generic word text
    DIR/chat/ DIR/math/ DIR/code/   the base fine-tuned on one synthetic task each
    DIR/data/{chat,math,code}.jsonl  held-out evaluation records of each task

chat is plain text (loss on every token); math (`12+7=` → `19`) and code (`def add_7(x): return x`
→ ` + 7`) are prompt/answer records (loss on the answer, greedy exact match). The numbers are small
on purpose: the point is a real base, real task vectors and a table where methods differ.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .tiny import TinySpec, save_model, tiny_config, tiny_tokenizer

TASKS = ("chat", "math", "code")
_NAMES = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ida", "jo", "kim", "lu"]
_GREETINGS = ["hi", "hello", "hey", "good day"]
_MOODS = ["fine", "great", "well", "happy", "ok"]
_WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this "
          "from or had by word but what some we can out other were all there when up use your how "
          "said an each she which do their time if will way about many then them write would like so "
          "these her long make thing see him two has look more day could go come did number sound no "
          "most people my over know water than call first who may down side been now find").split()


def _chat(rng: random.Random) -> dict:
    a, b = rng.sample(_NAMES, 2)
    g, m = rng.choice(_GREETINGS), rng.choice(_MOODS)
    return {"text": f"{a}: {g} {b}, how are you? {b}: {g} {a}, i am {m}, thanks!"}


def _math(rng: random.Random) -> dict:
    x, y = rng.randint(0, 19), rng.randint(0, 19)
    return {"prompt": f"{x}+{y}=", "answer": str(x + y)}


def _code(rng: random.Random) -> dict:
    op, sym = rng.choice([("add", "+"), ("sub", "-"), ("mul", "*")])
    k = rng.randint(2, 9)
    var = rng.choice("xyzn")
    return {"prompt": f"def {op}_{k}({var}): return {var}", "answer": f" {sym} {k}"}


def _generic(rng: random.Random) -> dict:
    return {"text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 10)))}


MAKERS = {"chat": _chat, "math": _math, "code": _code}


def _as_text(record: dict) -> str:
    return record["text"] if "text" in record else record["prompt"] + record["answer"]


def task_tokenizer():
    """The char tokenizer of `tiny`, adding BOS in front like LLaMA's own tokenizers do.

    The models learn to lean on BOS (an attention sink); evaluation tokenizes with the saved
    tokenizer's defaults, so the BOS must come from the tokenizer, not from the training loop.
    """
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def _train(model, tok, texts: list[str], steps: int, lr: float, seed: int, batch_size: int = 32) -> float:
    """Plain next-token training on whole strings (BOS + text + EOS); returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(enc), (batch_size,), generator=g).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((batch_size, width), tok.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(enc[i])] = labels[j, :len(enc[i])] = torch.tensor(enc[i])
            mask[j, :len(enc[i])] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def build_tiny_tasks(root: str | Path, *, base_steps: int = 300, ft_steps: int = 300, eval_samples: int = 200,
                     seed: int = 0, spec: TinySpec | None = None) -> dict[str, Path]:
    """Train the tiny base and one fine-tune per task; write them and the eval data under `root`.

    Returns {"base": DIR/base, "chat": ..., "math": ..., "code": ..., "data": DIR/data}.
    """
    root = Path(root)
    # Matrices this small gain nothing from intra-op threads and lose a lot to their syncing,
    # most of all on a busy machine (measured 16x slower with 2 threads beside other jobs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(root, base_steps, ft_steps, eval_samples, seed, spec)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, base_steps: int, ft_steps: int, eval_samples: int, seed: int,
           spec: TinySpec | None) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    spec = spec or TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, dtype=torch.float32,
                            max_shard_size="5GB")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = task_tokenizer()
    base = LlamaForCausalLM(tiny_config(spec))
    _train(base, tok, [_generic(rng)["text"] for _ in range(2000)], base_steps, 3e-3, seed)
    save_model(base, tok, root / "base", spec)
    out = {"base": root / "base", "data": root / "data"}
    (root / "data").mkdir(parents=True, exist_ok=True)
    for t, name in enumerate(TASKS, 1):
        make = MAKERS[name]
        train = [_as_text(make(rng)) for _ in range(2000)]
        eval_rng = random.Random(10_000 + seed * 100 + t)  # held out: another stream of the generator
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            for _ in range(eval_samples):
                f.write(json.dumps(make(eval_rng)) + "\n")
        ft = LlamaForCausalLM(tiny_config(spec))
        ft.load_state_dict(base.state_dict())
        _train(ft, tok, train, ft_steps, 1e-3, seed * 100 + t)
        save_model(ft, tok, root / name, spec)
        out[name] = root / name
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_metagpt.demo.tiny_tasks [DIR]`: what recipes/compare-tiny.yaml compares."""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m hf_metagpt.demo.tiny_tasks",
        description="Train a tiny base and one fine-tune per task on the spot (CPU, about a minute).")
    parser.add_argument("folder", nargs="?", default="tiny-tasks", help="where to save them (default: ./tiny-tasks)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_tiny_tasks(args.folder)
    print("\n".join(str(p) for p in paths.values()))
    print(f"built in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
