"""The offline demo: a local Hub, tiny models published to it, merged by ID, pushed with a card.

`hf-metagpt demo` runs the whole user journey without internet in a minute or two:

1. start the local Hub (`localhub.LocalHub`) in this process on a free port;
2. in a child process whose environment points huggingface_hub at it (`HF_ENDPOINT` is read once,
   at import, so the client must start with it set): build a tiny LLaMA base and three fine-tunes,
   publish them as `demo/tiny-llama-base` and `demo/tiny-llama-{chat,math,code}` (through Xet, as
   huggingface_hub with hf_xet does on the Hub: the local Hub stores LFS files in Xet);
3. merge them by Hub ID with MetaGPT and push the result with its model card to
   `demo/tiny-llama-metagpt`;
4. download the pushed card and plot back and show where they are and what the card says.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

USER = "demo"
BASE_ID = f"{USER}/tiny-llama-base"
TASKS = ["chat", "math", "code"]
MERGED_ID = f"{USER}/tiny-llama-metagpt"
LICENSE = "apache-2.0"


def run_demo(workdir: str | Path | None = None, *, progress: bool = True) -> int:
    """Serve a local Hub here and run the client side of the demo in a child process."""
    from ..localhub import LocalHub

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hf-metagpt-demo-"))
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = "hf_demo_" + secrets.token_hex(16)  # lives only in this process and the child's env
    hub = LocalHub(root / "hub-data", tokens={token: USER}, xet=True)  # Xet storage, as the Hub's new uploads
    endpoint = hub.start()
    print(f"Local Hub at {endpoint} (data in {root / 'hub-data'})", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HOME=str(root / "hf-home"), HF_TOKEN=token)
    cmd = [sys.executable, "-m", "hf_metagpt.demo.run", str(root)] + ([] if progress else ["--quiet"])
    try:
        code = subprocess.run(cmd, env=env).returncode
        if code == 0:
            print(_xet_summary(hub), flush=True)
        return code
    finally:
        hub.stop()


def _xet_summary(hub) -> str:
    """What went through the local Hub's Xet storage (hf_xet's CAS protocol), from its request log."""
    done = [r for r in hub.requests if r.status is not None and r.status < 300]
    xorbs = sum(r.method == "POST" and r.path.startswith("/v1/xorbs/") for r in done)
    shards = sum(r.method == "POST" and r.path in ("/v1/shards", "/v2/shards") for r in done)
    files = sum(r.method == "GET" and "/reconstructions/" in r.path for r in done)
    return (f"Xet storage: {xorbs} xorbs and {shards} shards uploaded, {files} file reconstructions served "
            "(hf_xet against the local Hub's CAS)")


def _client(root: Path, progress: bool) -> int:
    """The user's side, against whatever HF_ENDPOINT points at (set before this import)."""
    import logging

    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    import hf_metagpt
    from hf_metagpt.demo.tiny import build_family

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # upload, header-parse and fetch bars too, not only ours
    api = HfApi()
    models = root / "models"
    print("Building a tiny LLaMA base and three fine-tunes ...", flush=True)
    base, fts = build_family(models, n_models=3, names=TASKS)
    ids = [BASE_ID] + [f"{USER}/tiny-llama-{t}" for t in TASKS]
    for repo, folder in zip(ids, [base, *fts]):
        (folder / "README.md").write_text(f"---\nlicense: {LICENSE}\nlibrary_name: transformers\n---\n"
                                          f"# {repo.split('/')[1]}\n\nA tiny model for the hf-metagpt demo.\n")
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload tiny model")
        print(f"  published {repo}", flush=True)

    print(f"\n$ hf-metagpt merge --base {BASE_ID} {' '.join(ids[1:])} --output {root / 'merged'} "
          f"--push-to {MERGED_ID}\n", flush=True)
    result = hf_metagpt.merge(base=BASE_ID, models=ids[1:], output=str(root / "merged"), push_to=MERGED_ID,
                              overwrite=True, progress=progress)
    print(result.summary(), flush=True)

    card_path = Path(hf_hub_download(MERGED_ID, "README.md"))
    plot_path = Path(hf_hub_download(MERGED_ID, "metagpt_lambdas.png"))
    from ..insight.plots import COSINES, LAYER_SHARES

    geometry_paths = [Path(hf_hub_download(MERGED_ID, name)) for name in (LAYER_SHARES, COSINES)]
    card = ModelCard.load(card_path)
    d = card.data
    print("\nThe pushed model card, downloaded back from the Hub:")
    print(f"  repo:                {result.pushed_url}")
    print(f"  card:                {card_path}")
    print(f"  λ plot:              {plot_path}")
    print(f"  layer shares plot:   {geometry_paths[0]}")
    print(f"  cosines plot:        {geometry_paths[1]}")
    if result.geometry is not None:
        whole = result.geometry.whole
        pairs = [f"{i + 1}·{j + 1} {whole.cosine(i, j):+.3f}" for i in range(len(result.models))
                 for j in range(i + 1, len(result.models))]
        print(f"  task-vector cosines: {', '.join(pairs)} (whole model; per layer in the card)")
    print(f"  base_model:          {d.base_model}")
    print(f"  base_model_relation: {d.base_model_relation}")
    print(f"  license:             {d.license}")
    print(f"  tags:                {d.tags}")
    print("  inputs pinned to:")
    for ref in [result.base, *result.models]:
        print(f"    {ref.repo_id}@{ref.sha}")
    print(f"\nLocal copy of the merge: {result.output}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(_client(Path(args[0]), progress="--quiet" not in args))
