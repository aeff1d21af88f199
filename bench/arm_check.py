"""Same bytes on an ARM CPU? The 25 deterministic cases of tests/methods/test_cuda.py merged by an
aarch64 Python under user-mode emulation (qemu), compared with this machine's bytes.

    python bench/arm_check.py                 # sets up the emulated aarch64 Python once (~1 GB), then ~2 min
    python bench/arm_check.py --work DIR      # where the aarch64 files live (default: a folder in the temp dir)

Set-up, done once into --work (needs root for apt-get, and the network to Debian's and PyPI's indexes):
qemu-user-static from Debian; Debian's arm64 packages of Python 3.11 and its libraries, downloaded
and unpacked (not installed: they would replace this machine's own); torch (an aarch64 CPU wheel,
`--torch`, default 2.9.1, the newest aarch64 CPU build on PyPI when written) and the project's
dependencies as aarch64 wheels, installed with `pip --target`. Nothing of this enters the project.

What it measures: the torch version differs from this machine's unless `--torch` matches it, so a
difference is ARM's kernels (NEON, OpenBLAS) or torch's version; the report says both versions.
A development tool: it prints a table and exits 0 (nothing in the test suite needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QEMU = Path("/usr/bin/qemu-aarch64-static")
#: Debian arm64 packages a Python 3.11 needs to run (unpacked into the sysroot)
DEBS = ("python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libssl3 libffi8 "
        "libbz2-1.0 liblzma5 libsqlite3-0 libgcc-s1 libstdc++6 libcrypt1 libuuid1 libncursesw6 libtinfo6 "
        "libreadline8 libgomp1 libnsl2 libtirpc3 libdb5.3 libgdbm6").split()
#: aarch64 wheels besides torch (torch goes in without its CUDA dependencies: the CPU build needs none)
WHEELS = ("transformers huggingface_hub safetensors pyyaml tqdm psutil matplotlib numpy filelock typing_extensions "
          "sympy networkx jinja2 fsspec packaging").split()
NO_DEPS = ("accelerate", "peft", "pytest", "pluggy", "iniconfig")

#: runs every case on one device of one machine and prints {"torch", "capability", "digests"}
CHILD = """
import importlib.util, json, sys, tempfile
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("test_cuda", sys.argv[1])
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
family = Path(sys.argv[2])
base, fts = family / "base", sorted(p for p in family.iterdir() if p.name != "base")
out = {}
with tempfile.TemporaryDirectory() as tmp:
    for case in tc.DETERMINISTIC_CASES:
        out[case[0]] = tc.merge_digest(base, fts, Path(tmp) / case[0], case, "cpu")
print(json.dumps({"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "digests": out}))
"""


def set_up(work: Path, torch_version: str) -> None:
    root, site = work / "root", work / "site"
    if not QEMU.exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-user-static"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (root / "usr" / "bin" / "python3.11").exists():
        subprocess.run(["dpkg", "--add-architecture", "arm64"], check=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        debs = work / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for name in DEBS:
            subprocess.run(["apt-get", "download", f"{name}:arm64"], cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    if not (site / "torch").exists():
        target = ["--target", str(site), "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_17_aarch64",
                  "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "--implementation", "cp",
                  "--abi", "cp311", "--only-binary=:all:"]
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run(pip + target + ["--no-deps", f"torch=={torch_version}"], check=True)
        subprocess.run(pip + target + list(WHEELS), check=True)
        subprocess.run(pip + target + ["--no-deps", *NO_DEPS], check=True)


def run_cases(python: list[str], family: Path, env: dict) -> dict:
    r = subprocess.run(python + ["-c", CHILD, str(REPO / "tests" / "methods" / "test_cuda.py"), str(family)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"cases failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hf-metagpt-arm")
    p.add_argument("--torch", default="2.9.1", help="the aarch64 torch version (a CPU build on PyPI)")
    args = p.parse_args(argv)
    work = args.work
    set_up(work, args.torch)
    sys.path.insert(0, str(REPO / "tests" / "methods"))
    from test_cuda import family as build  # noqa: E402  (tests/methods/test_cuda.py)

    fam = work / "family"
    if not (fam / "base").exists():
        build(fam)
    host_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    arm_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), str(REPO), str(REPO / "tests")]),
               "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(work / "mpl"), "HF_HOME": str(work / "hf-home")}
    host = run_cases([sys.executable], fam, host_env)
    arm = run_cases([str(QEMU), "-L", str(work / "root"), str(work / "root" / "usr" / "bin" / "python3.11")], fam, arm_env)
    same = [k for k in host["digests"] if host["digests"][k] == arm["digests"].get(k)]
    print(f"this machine: torch {host['torch']} ({host['capability']}); aarch64 (emulated): torch {arm['torch']} "
          f"({arm['capability']})")
    print("| case | same bytes on aarch64 |\n|---|---|")
    for k in host["digests"]:
        print(f"| {k} | {'yes' if k in same else 'NO'} |")
    print(f"\n{len(same)} of {len(host['digests'])} cases the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
