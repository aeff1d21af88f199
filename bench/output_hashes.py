"""Behaviour-preservation check for refactors: sha256 of every output file of many merges.

    python bench/output_hashes.py OUT.json [--work DIR] [--only NAME,...]
    python bench/output_hashes.py --compare BEFORE.json AFTER.json

Builds tiny families (seeded: the same bytes on every run), merges them with every method and
granularity, with small read pieces (row slabs, reduce-only steps), other output dtypes, tied
embeddings, added tokens, LoRA adapters (full and merged-adapter output), by Hub ID from the
package's local Hub (plain and --low-disk) and in two processes, and records the sha256 of each
output's weight files and the λ of its coefficients file. Run it before a refactor and after; the
two files must be equal. Everything goes through the CLI (`hf_metagpt.cli.main`, or a subprocess
for two processes), whose flags a refactor keeps.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HUB_USER, HUB_TOKEN = "bench", "hf_benchtoken"


def _start_hub(tmp: Path):
    """A local Hub on a free loopback port; the environment is set before huggingface_hub is imported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1",
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
                      HF_HOME=str(tmp / "hf-home"), HF_TOKEN=HUB_TOKEN)
    try:
        from hf_metagpt.localhub import LocalHub
    except ImportError:
        from hf_metagpt.hub_server import LocalHub  # before the local Hub became a package
    hub = LocalHub(str(tmp / "hub-data"), port=port, tokens={HUB_TOKEN: HUB_USER})
    hub.start()
    return hub


def _build_family(root: Path, **spec):
    try:
        from hf_metagpt.demo.tiny import TinySpec, build_family
    except ImportError:
        from hf_metagpt.tiny import TinySpec, build_family  # before the demo became a package
    return build_family(root, names=["chat", "math", "code"], spec=TinySpec(**spec))


def _add_tokens(src: Path, dst: Path, n: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    if dst.exists():
        return dst
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(src)
    old = model.config.vocab_size
    model.resize_token_embeddings(old + n)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = torch.randn(n, model.config.hidden_size).to(model.dtype)
        model.get_output_embeddings().weight[old:] = torch.randn(n, model.config.hidden_size).to(model.dtype)
    model.save_pretrained(dst, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def _adapters(base: Path, root: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for t in (1, 2, 3):
        d = root / f"ad{t}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                               LoraConfig(r=4 * t, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * t)
        model.save_pretrained(d)
    return out


def _digest(folder: Path) -> dict:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors" or p.name.endswith(".index.json"):
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    coef = folder / "metagpt_coefficients.json"
    lams = None
    if coef.is_file():
        data = json.loads(coef.read_text())
        lams = {g: [v.get("lambdas"), v.get("sq_norms")] for g, v in (data.get("groups") or {}).items()}
    return {"files": files, "lambdas": lams}


def _cli(args: list[str], env: dict[str, str] | None = None) -> None:
    from hf_metagpt.cli import main

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        code = main(["-q", *args])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if code != 0:
        raise SystemExit(f"merge failed ({code}): {args}")


def cases(work: Path) -> dict[str, callable]:
    fam = work / "family"
    base, fts = (fam / "base", [fam / n for n in ("chat", "math", "code")])
    tied = work / "tied"
    shard = ["--max-shard-size", "60KB", "--device", "cpu"]
    out = work / "out"

    def merge(name: str, models: list, *extra: str, env: dict | None = None, base_=None):
        def run() -> dict:
            target = out / name
            shutil.rmtree(target, ignore_errors=True)
            _cli(["merge", *map(str, models), "--base", str(base_ or base), "-o", str(target), *shard, *extra], env)
            return _digest(target)
        return run

    c = {}
    for g in ("model", "layer", "tensor"):
        c[f"metagpt-{g}"] = merge(f"metagpt-{g}", fts, "--granularity", g)
        c[f"metagpt-{g}-slabs"] = merge(f"metagpt-{g}-slabs", fts, "--granularity", g, env={"HF_METAGPT_UNIT_MB": "0.02"})
    for m in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "metagpt_ties", "metagpt_dare"):
        c[m] = merge(m, fts, "--method", m, "--seed", "3")
    c["metagpt_ties-layer"] = merge("metagpt_ties-layer", fts, "--method", "metagpt_ties", "--granularity", "layer")
    c["metagpt_dare-tensor"] = merge("metagpt_dare-tensor", fts, "--method", "metagpt_dare", "--granularity", "tensor")
    c["task_arithmetic-weights"] = merge("ta-w", fts, "--method", "task_arithmetic", "--param", "weights=[0.5,0.3,0.2]")
    c["ties-density"] = merge("ties-d", fts, "--method", "ties", "--param", "density=0.3")
    c["metagpt-float32"] = merge("m-f32", fts, "--dtype", "float32")
    c["metagpt-float16"] = merge("m-f16", fts, "--dtype", "float16", "--granularity", "layer")
    c["metagpt-two-models"] = merge("m-two", fts[:2])
    c["metagpt-tied"] = merge("m-tied", [tied / n for n in ("chat", "math", "code")], base_=tied / "base")
    c["metagpt-tied-layer-slabs"] = merge("m-tied-ls", [tied / n for n in ("chat", "math", "code")], "--granularity", "layer",
                                          base_=tied / "base", env={"HF_METAGPT_UNIT_MB": "0.02"})

    def vocab() -> dict:
        big = _add_tokens(fts[1], work / "math-plus", 5)
        return merge("m-vocab", [fts[0], big, fts[2]], "--tokenizer-source", str(big))()
    c["metagpt-vocab"] = vocab

    def vocab_layer_slabs() -> dict:
        big = _add_tokens(fts[1], work / "math-plus", 5)
        return merge("m-vocab-ls", [fts[0], big, fts[2]], "--tokenizer-source", str(big), "--granularity", "layer",
                     env={"HF_METAGPT_UNIT_MB": "0.02"})()
    c["metagpt-vocab-layer-slabs"] = vocab_layer_slabs

    def lora(kind: str, *extra: str, env: dict | None = None):
        def run() -> dict:
            ads = _adapters(base, work / "adapters")
            return merge(f"lora-{kind}", ads, *extra, env=env)()
        return run
    c["lora-model"] = lora("model")
    c["lora-layer-slabs"] = lora("layer", "--granularity", "layer", env={"HF_METAGPT_UNIT_MB": "0.02"})
    c["lora-ties"] = lora("ties", "--method", "ties")
    c["lora-mixed"] = lambda: merge("lora-mixed", [fts[0], *_adapters(base, work / "adapters")[1:]])()
    c["lora-output"] = lora("out", "--output-format", "lora")

    def hub(name: str, *extra: str):
        def run() -> dict:
            ids = _hub_ids(work)
            return merge(name, ids[1:], *extra, base_=ids[0])()
        return run
    c["hub-model"] = hub("hub-model")
    c["hub-low-disk"] = hub("hub-low-disk", "--low-disk")
    c["hub-low-disk-layer"] = hub("hub-low-disk-layer", "--low-disk", "--granularity", "layer")

    def two(g: str):
        def run() -> dict:
            target = out / f"two-{g}"
            shutil.rmtree(target, ignore_errors=True)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", *map(str, fts), "--base", str(base),
                            "-o", str(target), *shard, "--granularity", g, "--num-processes", "2"],
                           check=True, env=env, cwd=work)
            return _digest(target)
        return run
    c["two-processes-model"] = two("model")
    c["two-processes-layer"] = two("layer")
    return c


_HUB_IDS: list[str] = []


def _hub_ids(work: Path) -> list[str]:
    if _HUB_IDS:
        return _HUB_IDS
    from huggingface_hub import HfApi

    api = HfApi()
    fam = work / "family"
    for name in ("base", "chat", "math", "code"):
        repo = f"{HUB_USER}/tiny-{name}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=fam / name, commit_message=f"tiny {name}")
        _HUB_IDS.append(repo)
    return _HUB_IDS


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            bad += 1
            print(f"DIFFERENT  {name}")
        else:
            print(f"same       {name}  ({len(a[name]['files'])} files)")
    print(f"{len(set(a) | set(b)) - bad} same, {bad} different")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--work", help="where fixtures and outputs go (default: a temporary folder)")
    p.add_argument("--only", help="comma-separated case names")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    work = Path(args.work or tempfile.mkdtemp(prefix="hf-metagpt-hashes-"))
    work.mkdir(parents=True, exist_ok=True)
    hub = _start_hub(work)
    try:
        if not (work / "family" / "code").exists():
            _build_family(work / "family")
        if not (work / "tied" / "code").exists():
            _build_family(work / "tied", tie_word_embeddings=True)
        import peft  # noqa: F401  (imported up front: the CLI's own lazy imports are not what this checks)

        results = {}
        todo = cases(work)
        only = set(args.only.split(",")) if args.only else None
        for name, run in todo.items():
            if only and name not in only:
                continue
            print(f"{name} ...", flush=True)
            with contextlib.redirect_stderr(sys.stderr):
                results[name] = run()
        text = json.dumps(results, indent=1, sort_keys=True)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
