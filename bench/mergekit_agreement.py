"""Run the same mergekit recipes through mergekit and hf-metagpt and compare the outputs tensor by tensor.

    python bench/mergekit_agreement.py                     # builds bench/.venv-mergekit once (as run.py)
    python bench/mergekit_agreement.py --venv DIR          # a venv that has mergekit installed
    python bench/mergekit_agreement.py --only ties --only slerp --keep
    python bench/mergekit_agreement.py --real bench/recipes-real      # published recipes, tiny stand-ins

Fixtures: tiny LLaMA families (`hf_metagpt.demo.tiny`, 4 layers, hidden 64) in bf16 and in fp32, a base
and three fine-tunes. Each recipe is mergekit YAML with `dtype: float32` (mergekit computes in
float32, as we do) and `out_dtype` the fixture's dtype; hf-metagpt reads the very same file
(`hf-metagpt merge --recipe`).

Deterministic methods: per method, the share of elements that differ, the elements more than
1 ulp apart (ulp of the output dtype) and the largest ulp distance. Random methods (DARE, DELLA:
mergekit draws from torch's global generator, we from a per-tensor seeded one, so masks differ by
design): the ratio of the spread of the merged task vector std(θ − θ0) and of its share of
changed entries, ours / mergekit's, over the whole model.

`--real DIR`: every published recipe in DIR (one file each, its source on the first line) runs on
tiny stand-ins: each model the recipe names becomes a tiny LLaMA of one family (as many layers as
its largest `layer_range`, else 8; `model+adapter` names a tiny LoRA adapter on that model's
stand-in), the recipe is rewritten to their folders and run by both tools. Equal: bit for bit or
≤ 1 ulp for deterministic methods; for DARE/DELLA (random masks) the spread ‖θ − θ0‖ and the share
of changed elements within 3× mergekit's own seed-to-seed difference (two mergekit seeds).

mergekit is a peer we measure, never a dependency: it runs in its own venv as a subprocess, and no
code of it is imported or copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))

#: name -> (recipe body after base_model/dtype lines, random?). {base}, {m1}, {m2}, {m3} are model folders.
RECIPES: dict[str, tuple[str, bool]] = {
    "linear": ("""merge_method: linear
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
""", False),
    "task_arithmetic": ("""merge_method: task_arithmetic
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{lambda: 0.9}}
""", False),
    "ties w=1": ("""merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {m1}
    parameters: {{weight: 1, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 1, density: 0.5}}
  - model: {m3}
    parameters: {{weight: 1, density: 0.5}}
""", False),
    "ties .5/.3/.2": ("""merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {m3}
    parameters: {{weight: 0.2, density: 0.5}}
""", False),
    "ties all .5": ("""merge_method: ties
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
parameters: {{weight: 0.5, density: 0.5}}
""", False),
    "ties gradient+filter": ("""merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters:
      weight:
        - filter: self_attn
          value: 0.8
        - value: 0.4
      density: [0.3, 0.9]
  - model: {m2}
    parameters: {{weight: [0.2, 0.6], density: 0.5}}
parameters: {{normalize: false, lambda: 1.2}}
""", False),
    "breadcrumbs": ("""merge_method: breadcrumbs
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.8, gamma: 0.05}}
""", False),
    "breadcrumbs_ties": ("""merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.7, gamma: 0.02, normalize: true}}
""", False),
    "slerp": ("""merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""", False),
    "model_stock": ("""merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
""", False),
    "model_stock filter_wise": ("""merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
parameters: {{filter_wise: true}}
""", False),
    "sce": ("""merge_method: sce
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
parameters: {{select_topk: 0.5}}
""", False),
    "dare_linear": ("""merge_method: dare_linear
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.5}}
""", True),
    "dare_ties": ("""merge_method: dare_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.5}}
""", True),
    "della": ("""merge_method: della
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.5, epsilon: 0.1}}
""", True),
    "della_linear": ("""merge_method: della_linear
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
parameters: {{density: 0.5, epsilon: 0.1}}
""", True),
}

MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as integers whose difference counts the representable values between them (ulps)."""
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).to(torch.int64)
        sign = bits < 0
        mag = bits & 0x7FFF
    else:
        bits = t.to(torch.float32).view(torch.int32).to(torch.int64)
        sign = bits < 0
        mag = bits & 0x7FFFFFFF
    return torch.where(sign, -mag, mag)


def compare_exact(ours: dict, theirs: dict, inputs: list[dict]) -> dict:
    """Elements that differ, beyond 1 ulp, and beyond 1 ulp where the value is not a cancellation.

    A cancellation: the two results are within float32 rounding of the inputs (4 ulps of float32
    at max_t |θt|) — where the exact result is ~0, mergekit's float32 sum keeps its rounding error
    (~1e-10) and ours (float64) does not, which is thousands of ulps of a tiny number.
    """
    n = differ = beyond = unexplained = 0
    worst = worst_unexplained = 0
    for name, b in theirs.items():
        a = ours[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise SystemExit(f"{name}: ours {a.dtype} {tuple(a.shape)} vs mergekit {b.dtype} {tuple(b.shape)}")
        d = (ordered_bits(a) - ordered_bits(b)).abs()
        n += d.numel()
        differ += int((d > 0).sum())
        far = d > 1
        beyond += int(far.sum())
        worst = max(worst, int(d.max()) if d.numel() else 0)
        if bool(far.any()) and a.is_floating_point() and inputs:  # (--real passes no inputs)
            scale = torch.stack([m[name].double().abs() for m in inputs]).amax(dim=0)
            gap = (a.double() - b.double()).abs()
            odd = far & (gap > 4 * 2.0**-23 * scale)
            unexplained += int(odd.sum())
            if bool(odd.any()):
                worst_unexplained = max(worst_unexplained, int(d[odd].max()))
    return {"elements": n, "differ": differ, "beyond_1ulp": beyond, "max_ulp": worst,
            "beyond_1ulp_not_cancellation": unexplained, "max_ulp_not_cancellation": worst_unexplained}


def compare_stats(ours: dict, theirs: dict, base: dict) -> dict:
    sq = {"ours": 0.0, "mergekit": 0.0}
    changed = {"ours": 0, "mergekit": 0}
    n = 0
    for name, b in theirs.items():
        if not b.is_floating_point():
            continue
        b0 = base[name].double()
        for who, t in (("ours", ours[name]), ("mergekit", b)):
            d = t.double() - b0
            sq[who] += float((d * d).sum())
            changed[who] += int((d != 0).sum())
        n += b.numel()
    return {"elements": n, "spread_ratio": (sq["ours"] / sq["mergekit"]) ** 0.5 if sq["mergekit"] else float("nan"),
            "changed_ours": changed["ours"] / n, "changed_mergekit": changed["mergekit"] / n}


def mergekit_exe(venv: str | None) -> Path:
    if venv:
        exe = Path(venv) / "bin" / "mergekit-yaml"
        if not exe.exists():
            raise SystemExit(f"{exe} not found: pass --venv a venv with mergekit installed.")
        return exe
    sys.path.insert(0, str(BENCH_DIR))
    from run import ensure_mergekit  # builds bench/.venv-mergekit once

    exe, why = ensure_mergekit()
    if exe is None:
        raise SystemExit(why)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", help="venv with mergekit (default: bench/.venv-mergekit, built once)")
    p.add_argument("--only", action="append", help="recipe name (repeatable); default all")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float32"], help="fixture dtype(s)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--real", type=Path, metavar="DIR", help="run the published recipes in DIR on tiny stand-ins")
    args = p.parse_args(argv)
    exe = mergekit_exe(args.venv)
    if args.real:
        return run_real(exe, args)
    version = subprocess.run([str(exe.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip()
    from hf_metagpt.demo.tiny import TinySpec, build_family

    work = Path(tempfile.mkdtemp(prefix="mk-agree-"))
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "HF_HUB_OFFLINE": "1"}
    for dtype in args.dtype or ["bfloat16", "float32"]:
        tdt = getattr(torch, dtype)
        base_dir, fts = build_family(work / dtype, n_models=3, spec=TinySpec(dtype=tdt), seed=3)
        base_state = load(base_dir)
        inputs = [base_state, *(load(f) for f in fts)]
        for name, (body, random) in RECIPES.items():
            if args.only and name not in args.only:
                continue
            slug = name.replace(" ", "_").replace("/", "-").replace("+", "-").replace("=", "")
            cfg = work / dtype / f"{slug}.yml"
            cfg.write_text(body.format(base=base_dir, m1=fts[0], m2=fts[1], m3=fts[2])
                           + f"dtype: float32\nout_dtype: {dtype}\n")
            mk_out, our_out = work / dtype / f"{slug}-mergekit", work / dtype / f"{slug}-ours"
            t0 = time.perf_counter()
            mk = subprocess.run([str(exe), str(cfg), str(mk_out), *MERGEKIT_FLAGS], capture_output=True, text=True)
            t1 = time.perf_counter()
            ours = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--recipe", str(cfg),
                                   "--output", str(our_out), "--device", "cpu", "--overwrite"],
                                  capture_output=True, text=True, env=env)
            t2 = time.perf_counter()
            row = {"method": name, "dtype": dtype, "random": random, "mergekit_s": round(t1 - t0, 2),
                   "ours_s": round(t2 - t1, 2)}
            if mk.returncode != 0 or ours.returncode != 0:
                row["error"] = (mk.stderr.strip().splitlines() or ["?"])[-1] if mk.returncode else \
                    (ours.stderr.strip().splitlines() or ["?"])[-1]
                row["error"] = ("mergekit: " if mk.returncode else "hf-metagpt: ") + row["error"]
            else:
                a, b = load(our_out), load(mk_out)
                row.update(compare_stats(a, b, base_state) if random else compare_exact(a, b, inputs))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(table(rows, version))
    if args.json:
        args.json.write_text(json.dumps({"mergekit": version, "rows": rows}, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nwork folder kept: {work}")
    return 0


def table(rows: list[dict], version: str) -> str:
    lines = [f"mergekit {version} vs hf-metagpt, tiny LLaMA (4 layers, hidden 64), base + 3 fine-tunes; "
             "mergekit `dtype: float32`, `out_dtype` = fixture dtype.", "",
             "| method | dtype | elements differing | beyond 1 ulp | of which not cancellations (max ulp) "
             "| random: spread ours/mergekit, changed ours / mergekit |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['error']} | | | |")
        elif r["random"]:
            lines.append(f"| {r['method']} | {r['dtype']} | (random) | | | {r['spread_ratio']:.3f}, "
                         f"{100 * r['changed_ours']:.1f} % / {100 * r['changed_mergekit']:.1f} % |")
        else:
            lines.append(f"| {r['method']} | {r['dtype']} | {100 * r['differ'] / r['elements']:.3f} % | "
                         f"{r['beyond_1ulp']} | {r['beyond_1ulp_not_cancellation']} ({r['max_ulp_not_cancellation']}) | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- published recipes

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def recipe_refs(doc: object) -> list[str]:
    """Every model reference a recipe names (base_model, models, slices, modules, tokenizer source)."""
    out: list[str] = []

    def walk(node: object, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("model", "base_model") and node not in out:
            out.append(node)

    walk(doc)
    return out


def rewrite(doc: object, mapping: dict[str, str]) -> object:
    """The recipe with each model reference (and a tokenizer source naming one) replaced by its stand-in."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in ("model", "base_model", "source", "tokenizer_source") and isinstance(v, str) and v in mapping:
                out[k] = mapping[v]
            else:
                out[k] = rewrite(v, mapping)
        return out
    if isinstance(doc, list):
        return [rewrite(v, mapping) for v in doc]
    return doc


def max_layer(doc: object) -> int:
    best = 0
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "layer_range" and isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
                best = max(best, v[1])
            else:
                best = max(best, max_layer(v))
    elif isinstance(doc, list):
        best = max([0, *(max_layer(v) for v in doc)])
    return best


def stand_ins(doc: dict, work: Path) -> dict[str, str]:
    """Tiny models (and LoRA adapters) for every reference of a recipe: name -> folder."""
    refs = recipe_refs(doc)
    plain: list[str] = []
    for r in refs:
        m = r.split("+", 1)[0]
        if m not in plain:
            plain.append(m)
    base = doc.get("base_model")
    if isinstance(base, str) and base.split("+", 1)[0] in plain:
        plain.remove(base.split("+", 1)[0])
        plain.insert(0, base.split("+", 1)[0])
    layers = max_layer(doc) or 8
    folders = family(work.parent / "families", layers, len(plain))
    mapping = {name: str(folders[i]) for i, name in enumerate(plain)}
    for k, r in enumerate(refs):
        if "+" in r:
            model, adapter = r.split("+", 1)
            folder = work / f"adapter{k}"
            make_lora(Path(mapping[model]), folder, seed=100 + k)
            mapping[r] = f"{mapping[model]}+{folder}"
    return mapping


def family(root: Path, layers: int, count: int) -> list[Path]:
    """`count` tiny models (a base and fine-tunes) with `layers` layers, built once per layer count
    (the largest count asked for so far; seeded, so a smaller family is its first members)."""
    from hf_metagpt.demo.tiny import TinySpec, build_family

    folder = root / f"L{layers}"
    built = sorted(folder.glob("ft*")) if folder.is_dir() else []
    if not (folder / "base").is_dir() or len(built) + 1 < count:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        # vocab_size = the tiny tokenizer's 99 tokens, as most real models have (mergekit cuts the
        # embeddings to the tokenizer's length when a recipe names a tokenizer source)
        spec = TinySpec(num_hidden_layers=layers, vocab_size=99, dtype=torch.bfloat16, max_shard_size="5MB")
        base_dir, fts = build_family(folder, n_models=max(count - 1, 6), spec=spec, seed=11)
        built = fts
    fts = sorted(built, key=lambda f: int(f.name[2:]))
    return [folder / "base", *fts][:max(count, 1)]


def make_lora(base: Path, folder: Path, seed: int) -> None:
    """A LoRA adapter on `base` (q_proj, v_proj; rank 4) with non-zero B, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the error, not a progress bar
        if any(w in ln for w in ("Error", "error", "Refus", "not supported", "Hint", "Unknown", "must")):
            return ln[:300]
    return (lines or ["?"])[-1][:300]


def spread(state: dict, base: dict) -> tuple[float, float]:
    sq = 0.0
    changed = n = 0
    for name, t in state.items():
        if name not in base or not t.is_floating_point() or t.shape != base[name].shape:
            continue
        d = t.double() - base[name].double()
        sq += float((d * d).sum())
        changed += int((d != 0).sum())
        n += d.numel()
    return sq ** 0.5, changed / max(n, 1)


def run_real(exe: Path, args: argparse.Namespace) -> int:
    import yaml

    files = sorted(args.real.glob("*.yml"))
    if args.only:
        files = [f for f in files if any(o in f.name for o in args.only)]
    work = Path(tempfile.mkdtemp(prefix="mk-real-"))
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "HF_HUB_OFFLINE": "1"}
    rows = []
    for f in files:
        text = f.read_text()
        source = text.splitlines()[0].removeprefix("# source:").strip()
        doc = yaml.safe_load(text)
        method = doc.get("merge_method", "?")
        row: dict = {"recipe": f.stem, "method": method, "source": source}
        w = work / f.stem
        w.mkdir()
        try:
            mapping = stand_ins(doc, w)
        except Exception as exc:  # a recipe whose stand-ins cannot be built is reported, not fatal
            row.update(mergekit="?", ours="?", equal=False, why=f"stand-ins: {exc}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        cfg = w / "recipe.yml"
        cfg.write_text(yaml.safe_dump(rewrite(doc, mapping), sort_keys=False))
        random = method in RANDOM
        mk_runs = []
        for seed in ((1, 2) if random else (1,)):
            out = w / f"mergekit-{seed}"
            mk = subprocess.run([str(exe), str(cfg), str(out), *MERGEKIT_FLAGS, "--random-seed", str(seed),
                                 "--lora-merge-cache", str(w / "lora-cache")],
                                capture_output=True, text=True)
            mk_runs.append((mk, out))
        mk, mk_out = mk_runs[0]
        ours_out = w / "ours"
        ours = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--recipe", str(cfg),
                               "--output", str(ours_out), "--device", "cpu", "--overwrite"],
                              capture_output=True, text=True, env=env)
        row["mergekit"] = mk.returncode == 0
        row["ours"] = ours.returncode == 0
        row["equal"] = False
        if not row["mergekit"]:
            row["why"] = "mergekit: " + _last_line(mk.stderr)
        elif not row["ours"]:
            row["why"] = "hf-metagpt: " + _last_line(ours.stderr + ours.stdout)
        else:
            a, b = load(ours_out), load(mk_out)
            if sorted(a) != sorted(b) or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in b):
                row["why"] = (f"tensors differ: {len(set(a) ^ set(b))} names only in one output"
                              if sorted(a) != sorted(b) else "shapes or dtypes differ")
            elif random:
                base_state = load(Path(mapping[list(mapping)[0]].split("+")[0]))
                s_ours, c_ours = spread(a, base_state)
                s_mk, c_mk = spread(b, base_state)
                s_mk2, c_mk2 = spread(load(mk_runs[1][1]), base_state) if mk_runs[1][0].returncode == 0 else (s_mk, c_mk)
                row.update(spread_ratio=round(s_ours / s_mk, 5) if s_mk else None,
                           mk_seed_ratio=round(s_mk2 / s_mk, 5) if s_mk else None,
                           changed_ours=round(c_ours, 5), changed_mk=round(c_mk, 5), changed_mk2=round(c_mk2, 5))
                ok = (abs(s_ours - s_mk) <= 3 * abs(s_mk2 - s_mk) + 2e-3 * s_mk
                      and abs(c_ours - c_mk) <= 3 * abs(c_mk2 - c_mk) + 2e-3)
                row["equal"] = ok
                if not ok:
                    row["why"] = "spread or changed share outside mergekit's seed-to-seed range"
            else:
                cmp = compare_exact(a, b, [])
                row.update(differ=cmp["differ"], max_ulp=cmp["max_ulp"], elements=cmp["elements"])
                row["equal"] = cmp["max_ulp"] <= 1
                if not row["equal"]:
                    row["why"] = f"{cmp['beyond_1ulp']} of {cmp['elements']} elements beyond 1 ulp (max {cmp['max_ulp']})"
        if not args.keep:
            import shutil

            shutil.rmtree(w, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(real_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


def real_table(rows: list[dict]) -> str:
    n = len(rows)
    mk = [r for r in rows if r.get("mergekit") is True]
    ours = [r for r in mk if r.get("ours")]
    eq = [r for r in ours if r.get("equal")]
    pct = lambda a, b: f"{100 * a / b:.0f} %" if b else "-"  # noqa: E731
    lines = [f"{n} published recipes; mergekit 0.1.5 runs {len(mk)}; hf-metagpt runs {len(ours)} of those "
             f"({pct(len(ours), len(mk))}); equal to mergekit {len(eq)} ({pct(len(eq), len(mk))}).", "",
             "| recipe | method | mergekit | hf-metagpt | equal | why not |", "|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for r in rows:
        detail = r.get("why", "")
        if r.get("equal") and "spread_ratio" in r:
            detail = f"spread ours/mergekit {r['spread_ratio']}, mergekit seed/seed {r['mk_seed_ratio']}"
        elif r.get("equal"):
            detail = "bit for bit" if r.get("max_ulp") == 0 else f"≤ 1 ulp ({r.get('differ')} elements)"
        lines.append(f"| {r['recipe']} | {r['method']} | {yes.get(r.get('mergekit'), '?')} | "
                     f"{yes.get(r.get('ours'), '?')} | {yes.get(r.get('equal'), '?')} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
