"""A merge by Hub ID against a plain `snapshot_download` of the same inputs, from the local Hub.

    python bench/hub_vs_download.py [--fixture bench/fixtures/llama-1.1b] [--low-disk]

Publishes the fixture's base and fine-tunes to a local Hub (hf_metagpt.localhub), then times,
each with an empty Hub cache: (a) `snapshot_download` of every input, (b) `hf-metagpt merge` by ID
(default and, with --low-disk, `--low-disk`). Prints wall times and the ratio merge ÷ download.
Needs about 4× the fixture's size of free disk. Exits 0: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
TOKEN = "hf_bench_token"


def _env(endpoint: str, home: Path) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
                HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1")


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        return wall, f"FAILED: {r.stderr[-400:]}"
    return wall, (r.stdout.strip().splitlines() or [""])[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=BENCH / "fixtures" / "llama-1.1b")
    ap.add_argument("--low-disk", action="store_true")
    args = ap.parse_args()
    from hf_metagpt.localhub import LocalHub

    names = ["base", *sorted(p.name for p in args.fixture.glob("task_*"))]
    repos = [f"bench/{n}" for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with LocalHub(tmp / "hub", tokens={TOKEN: "bench"}) as hub:
            upload = ("from huggingface_hub import HfApi\nimport sys\napi = HfApi()\n"
                      "for repo, folder in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                      "    api.create_repo(repo, exist_ok=True)\n"
                      "    api.upload_folder(repo_id=repo, folder_path=folder)\n")
            argv = [x for r, n in zip(repos, names) for x in (r, str(args.fixture / n))]
            wall, note = _timed([sys.executable, "-c", upload, *argv], _env(hub.endpoint, tmp / "up-home"))
            print(f"published {len(repos)} repos in {wall:.1f} s {note}", flush=True)
            rows = []
            dl = ("from huggingface_hub import snapshot_download\nimport sys\n"
                  "for r in sys.argv[1:]: snapshot_download(r)\n")
            wall, note = _timed([sys.executable, "-c", dl, *repos], _env(hub.endpoint, tmp / "dl-home"))
            rows.append(("snapshot_download of every input", wall, note))
            shutil.rmtree(tmp / "dl-home", ignore_errors=True)
            cases = [("hf-metagpt merge by ID (layer)", [])]
            if args.low_disk:
                cases.append(("hf-metagpt merge by ID (layer, --low-disk)", ["--low-disk"]))
            for label, extra in cases:
                cmd = [sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", repos[0], *repos[1:],
                       "--output", str(tmp / "out"), "--granularity", "layer", "--overwrite", *extra]
                wall, note = _timed(cmd, _env(hub.endpoint, tmp / "m-home"))
                rows.append((label, wall, note))
                shutil.rmtree(tmp / "m-home", ignore_errors=True)
                shutil.rmtree(tmp / "out", ignore_errors=True)
    base = rows[0][1]
    print("| what | wall | ÷ snapshot_download |\n|---|---|---|")
    for label, wall, note in rows:
        print(f"| {label} | {wall:.1f} s | {wall / base:.2f}× |")
    for label, _, note in rows:
        if note.startswith("FAILED"):
            print(f"{label}: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
