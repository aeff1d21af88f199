"""CPU time of the card's pictures (and the card) for realistic model sizes; no merge, no weights.

    python bench/card_cost.py [--runs 5] [--out DIR] [--cases 1.1b-layer,80x5-model]

Builds a Geometry with Llama tensor names (9 tensors per block + embed, norm, lm_head; one pair of
fine-tunes overlapping in a few blocks) and the MergeResult a merge of it gives, then times each
picture in a loop (process CPU time, median of --runs after one warm-up) and the whole `write_card`
(its mean too: a full collection of the heap, 0.13–0.25 s with torch loaded, comes every few runs).
With --out the pictures of the last run stay there (one folder per case) for a look.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
#: name: (blocks, fine-tunes, granularity)
CASES = {
    "1.1b-layer": (22, 3, "layer"),
    "1.1b-model": (22, 3, "model"),
    "7b-layer": (32, 3, "layer"),
    "7b-5-model": (32, 5, "model"),
    "70b-layer": (80, 3, "layer"),
    "70b-5-layer": (80, 5, "layer"),
    "70b-5-model": (80, 5, "model"),
}


def make_geometry(blocks: int, t: int):
    import numpy as np

    from hf_metagpt.insight.geometry import Geometry

    rng = np.random.default_rng(0)
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{n}.{p}.weight" for n in range(blocks) for p in BLOCK]
    names += ["model.norm.weight", "lm_head.weight"]
    entries = []
    for name in names:
        x = rng.standard_normal((t, 64))
        x *= rng.uniform(0.5, 2.0, size=(t, 1))
        if ".layers.1." in name or ".layers.5." in name or name == "lm_head.weight":
            x[1] = x[0] + 0.2 * x[1]  # fine-tunes 1 and 2 overlap here
            x *= 3
        entries.append((name, (x @ x.T).tolist()))
    return Geometry.from_tensors([f"org/llama-ft-{k}-instruct" for k in range(t)], entries)


def make_result(geo, granularity: str):
    from hf_metagpt.engine.stats import StreamStats
    from hf_metagpt.result import MergeResult
    from hf_metagpt.sources.refs import ModelRef

    base = ModelRef(spec="org/llama-base", repo_id="org/llama-base", sha="a" * 40)
    models = [ModelRef(spec=m, repo_id=m, sha="b" * 40) for m in geo.models]
    coefficients = geo.lambdas(granularity)
    return MergeResult(output=None, base=base, models=models, method="metagpt", parameters={},
                       granularity=granularity, seed=None, coefficients=coefficients,
                       sq_norms={g: list(gr.sq_norms) for g, gr in geo.groups(granularity).items()},
                       stats=StreamStats(), recipe="base: org/llama-base\n")


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()

    import torch  # noqa: F401  (a merge's heap: the collector's full passes scan it)

    start = time.process_time()
    from hf_metagpt.insight import plots
    from hf_metagpt.publish.card import PLOT_FILE, plot_lambdas, write_card
    import matplotlib.backends.backend_agg  # noqa: F401  (what plots.preload loads during a merge)
    import matplotlib.figure  # noqa: F401
    from huggingface_hub import ModelCard  # noqa: F401
    print(f"imports (plots, card, matplotlib, ModelCard): {time.process_time() - start:.3f} s CPU")

    print(f"{'case':<13} {'λ plot':>8} {'shares':>8} {'cosines':>8} {'card':>8} {'(mean)':>8}   "
          f"(s CPU, median of {args.runs})")
    for case in args.cases.split(","):
        blocks, t, granularity = CASES[case]
        geo = make_geometry(blocks, t)
        result = make_result(geo, granularity)
        folder = args.out / case if args.out else Path(tempfile.mkdtemp(prefix="card-cost-"))
        folder.mkdir(parents=True, exist_ok=True)
        jobs = {
            "lambdas": lambda: plot_lambdas(result, folder / PLOT_FILE),
            "shares": lambda: plots.plot_layer_shares(geo, folder / plots.LAYER_SHARES),
            "cosines": lambda: plots.plot_cosines(geo, folder / plots.COSINES),
            "card": lambda: write_card(result, folder, geometry=geo),
        }
        times = {}
        for name, job in jobs.items():
            job()  # warm-up: font cache, first-use imports
            times[name] = [_cpu(job) for _ in range(args.runs)]
        print(f"{case:<13} " + " ".join(f"{statistics.median(times[k]):8.3f}" for k in jobs)
              + f" {statistics.mean(times['card']):8.3f}", flush=True)


if __name__ == "__main__":
    main()
