"""Read-ahead at CLI start (`engine.readahead`): which bytes, how many, and that it can fail nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_metagpt._platform import page_cached
from hf_metagpt.constants import READAHEAD_ENV
from hf_metagpt.engine import readahead
from hf_metagpt.engine.readahead import Span, first_reads, folder_extents, plan_spans, read_spans

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="Linux page-cache calls")


def _extents(path: str, sizes: dict[str, int], order: list[str]) -> dict[str, tuple[str, int, int]]:
    """Tensors laid out back to back in `order` (as a safetensors file sorts them: by name), after a 100-byte header."""
    out, pos = {}, 100
    for name in order:
        out[name] = (path, pos, pos + sizes[name])
        pos += sizes[name]
    return out


NAMES = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b",
         "model.layers.1.a", "model.layers.10.a", "model.layers.2.a", "model.norm.weight"]


def test_first_reads_follow_the_merge_order_each_input_in_turn_and_join_neighbours():
    sizes = dict.fromkeys(NAMES, 10)
    base = _extents("base.st", sizes, NAMES)  # file order is by name: layers.10 before layers.2
    ft = _extents("ft.st", sizes, NAMES)
    spans = first_reads([base, ft], budget=10**9)
    assert spans == [
        Span("base.st", 110, 10), Span("ft.st", 110, 10),      # embeddings first
        Span("base.st", 120, 20), Span("ft.st", 120, 20),      # layers.0: two tensors, one span each
        Span("base.st", 140, 10), Span("ft.st", 140, 10),      # layers.1
        Span("base.st", 160, 10), Span("ft.st", 160, 10),      # layers.2 (stored after layers.10)
        Span("base.st", 150, 10), Span("ft.st", 150, 10),      # layers.10
        Span("base.st", 100, 10), Span("ft.st", 100, 10),      # the rest by name: lm_head, norm
        Span("base.st", 170, 10), Span("ft.st", 170, 10)]
    assert sum(s.length for s in spans) == 2 * 10 * len(NAMES)


def test_the_budget_cuts_the_last_span_and_a_tensor_an_input_lacks_is_not_read():
    sizes = dict.fromkeys(NAMES, 10)
    base = _extents("base.st", sizes, NAMES)
    ft = _extents("ft.st", sizes, [n for n in NAMES if n != "model.embed_tokens.weight"])
    assert first_reads([base, ft], budget=35) == [Span("base.st", 110, 10), Span("base.st", 120, 20),
                                                  Span("ft.st", 110, 5)]
    assert first_reads([base, ft], budget=0) == [] and first_reads([], budget=100) == []


def test_the_budget_is_the_setting_or_the_default_and_at_most_a_quarter_of_the_available_memory(monkeypatch):
    meminfo = "MemTotal:       24000000 kB\nMemAvailable:   8000000 kB\n"
    monkeypatch.delenv(READAHEAD_ENV, raising=False)
    assert readahead.budget(meminfo) == min(readahead.DEFAULT_BUDGET, 8000000 * 1024 // 4) == 2048000000
    assert readahead.budget("MemAvailable: 80000000 kB\n") == readahead.DEFAULT_BUDGET == 4 << 30
    monkeypatch.setenv(READAHEAD_ENV, "100")
    assert readahead.budget(meminfo) == 100 << 20
    monkeypatch.setenv(READAHEAD_ENV, "0")
    assert readahead.budget(meminfo) == 0
    assert readahead.start(["anything"]) is None  # turned off: no thread
    monkeypatch.setenv(READAHEAD_ENV, "lots")
    assert readahead.budget(meminfo) == 2048000000  # not a number: the default
    monkeypatch.delenv(READAHEAD_ENV)
    assert readahead.budget("MemTotal: 1 kB\n") == 0  # memory unknown: nothing


def test_it_runs_from_8_cores_or_when_the_setting_asks_and_never_when_it_says_0(monkeypatch):
    monkeypatch.delenv(READAHEAD_ENV, raising=False)
    linux = sys.platform.startswith("linux")
    assert readahead.wanted(cores=16) is linux and readahead.wanted(cores=8) is linux
    assert not readahead.wanted(cores=2)  # a 2-core merge needs the CPU the copies out of the cache take
    assert readahead.wanted(cores=2, cached_reads=True) is linux  # a two-pass merge: no extra copy
    monkeypatch.setenv(READAHEAD_ENV, "512")
    assert readahead.wanted(cores=2) is linux
    monkeypatch.setenv(READAHEAD_ENV, "0")
    assert not readahead.wanted(cores=16)


def test_the_extents_of_a_sharded_folder_hold_each_tensors_bytes(tiny_family):
    base, _ = tiny_family(n_models=2)
    extents = folder_extents(base)
    assert len(list(base.glob("*.safetensors"))) > 1  # sharded: an index names the files
    n = 0
    for file in sorted(base.glob("*.safetensors")):
        data = file.read_bytes()
        with safe_open(file, "pt") as f:
            for name in f.keys():
                path, lo, hi = extents[name]
                assert path == str(file)
                t = f.get_tensor(name)
                assert data[lo:hi] == t.contiguous().view(torch.uint8).numpy().tobytes()
                n += 1
    assert n == len(extents)


def test_plan_spans_read_the_groups_in_the_plans_order(tiny_family):
    import hf_metagpt

    base, fts = tiny_family(n_models=2)
    specs = [str(base), *map(str, fts)]
    inputs = [folder_extents(Path(s)) for s in specs]
    spans = plan_spans(specs, 10**12)
    # each span named by the (input, tensors) it holds, compared with the plan's groups
    got = []
    for s in spans:
        k = next(i for i, ex in enumerate(inputs) if any(p == s.path for p, _, _ in ex.values()))
        got.append((k, sorted(n for n, (p, lo, hi) in inputs[k].items()
                              if p == s.path and s.offset <= lo and hi <= s.offset + s.length)))
    plan = hf_metagpt.plan(base=specs[0], models=specs[1:])
    want = [(k, sorted(t.name for t in g.tensors)) for g in plan.groups for k in range(len(specs))]
    flat_got = [(k, n) for k, names in got for n in names]
    flat_want = [(k, n) for k, names in want for n in sorted(names)]
    assert sorted(flat_got) == sorted(flat_want)  # every tensor of every input, once
    # and in the plan's order: the group of each (input, tensor) never goes back
    group_of = {name: j for j, g in enumerate(plan.groups) for name in (t.name for t in g.tensors)}
    order = [(group_of[n], k) for k, names in got for n in names]
    assert order == sorted(order)
    assert sum(s.length for s in spans) == sum(hi - lo for ex in inputs for _, lo, hi in ex.values())


def test_a_missing_or_broken_input_is_left_out_and_a_broken_base_reads_nothing(tiny_family, tmp_path):
    from helpers import copy_model

    base, fts = tiny_family(n_models=2)
    broken = copy_model(fts[0], tmp_path / "broken")
    first = sorted(broken.glob("*.safetensors"))[0]
    first.write_bytes(b"\xff" * 8)  # a header length past the end
    spans = plan_spans([str(base), str(broken), str(fts[1]), str(tmp_path / "missing"), "org/not-cached"], 10**12)
    paths = {s.path for s in spans}
    assert paths and all(p.startswith((str(base), str(fts[1]))) for p in paths)
    assert plan_spans([str(broken), str(base)], 10**12) == []
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    assert plan_spans([str(broken), str(base)], 10**12) == []


def test_the_read_ahead_checks_an_input_as_the_merge_does(tiny_family, tmp_path):
    """Headers and indexes are read by the merge's own functions (`safetensors_io.read_header`,
    `sources.local.local_weight_files`): a shard cut short inside its data, which the merge refuses,
    is not read ahead either, and neither is an index whose weight_map is not a mapping of files."""
    from helpers import copy_model

    from hf_metagpt.errors import InputError
    from hf_metagpt.sources.local import load_local_info
    from hf_metagpt.sources.refs import parse_ref

    base, fts = tiny_family(n_models=1)
    cut = copy_model(fts[0], tmp_path / "cut")
    last = sorted(cut.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-4])
    with pytest.raises(InputError, match="Corrupt safetensors"):
        load_local_info(parse_ref(str(cut)))
    with pytest.raises(InputError, match="Corrupt safetensors"):
        folder_extents(cut)
    assert {s.path for s in plan_spans([str(base), str(cut)], 10**12)} == {str(p) for p in base.glob("*.safetensors")}
    (cut / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(InputError, match="has no weight_map"):
        folder_extents(cut)


def test_headers_and_local_folders_are_read_without_torch_in_a_fresh_interpreter():
    code = ("import sys\n"
            "import hf_metagpt.safetensors_io as s, hf_metagpt.sources.local\n"
            "print('torch' in sys.modules, s.dtype_itemsize('BF16'), s.dtype_itemsize('F8_E4M3'))\n"
            "from hf_metagpt.safetensors_io import ST_TO_TORCH, TORCH_TO_ST\n"
            "import torch\n"
            "print(all(torch.empty((), dtype=t).element_size() == s.dtype_itemsize(c) and TORCH_TO_ST[t] == c\n"
            "          for c, t in ST_TO_TORCH.items()), len(ST_TO_TORCH), ST_TO_TORCH['BF16'])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["False 2 1", "True 15 torch.bfloat16"]


@linux_only
def test_read_spans_fill_the_page_cache_and_skip_what_is_cached(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1 << 20, dtype=torch.float32)}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if page_cached(fd, 2 << 20):
            pytest.skip("this file system keeps the pages (tmpfs)")
        span = Span(str(path), 4096, 3 << 20)
        assert read_spans([span]) == 3 << 20
        assert all(page_cached(fd, off) for off in range(4096, 4096 + (3 << 20), 4096))
        assert read_spans([span]) == 0  # cached now: a warm run reads nothing ahead
        assert read_spans([Span(str(path), 0, 10 << 20)], deadline=0.0) == 0  # past its deadline
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # a file shorter than the span (its header says more than it holds): what is there
        assert read_spans([Span(str(path), 4 << 20, 1 << 20)]) == path.stat().st_size - (4 << 20) > 0
    finally:
        os.close(fd)


def test_the_read_ahead_runs_without_torch_in_a_fresh_interpreter(tiny_family, tmp_path):
    base, fts = tiny_family(n_models=2)
    code = ("import sys, logging\nlogging.basicConfig(level=logging.DEBUG)\n"
            "from hf_metagpt.engine import readahead\n"
            f"specs = {[str(base), *map(str, fts), 'org/not-cached']!r}\n"
            "spans = readahead.plan_spans(specs, 10**12)\n"
            "t = readahead.start(specs)\nt.join()\n"
            "print(len(spans), sum(s.length for s in spans), 'torch' in sys.modules, 'huggingface_hub.file_download' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(tmp_path / "hub"))
    env[READAHEAD_ENV] = "4096"  # on whatever the cores here (`wanted`)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    n, nbytes, torch_in, client_in = run.stdout.split()
    total = sum(hi - lo for s in [base, *fts] for _, lo, hi in folder_extents(s).values())
    assert int(n) > 0 and int(nbytes) == total
    assert torch_in == "False" and client_in == "False"
    assert "read ahead" in run.stderr and "Traceback" not in run.stderr


def test_a_cli_merge_starts_the_read_ahead_before_torch_and_its_bytes_are_unchanged(tiny_family, tmp_path):
    base, fts = tiny_family(n_models=2)
    # The read-ahead is wrapped to run to its end before the merge goes on: torch is not imported by
    # then, and every input was named to it.
    # (printed by an atexit handler: the CLI's exit (`cli.exit_now`) runs them, then ends the process)
    code = ("import sys, runpy, atexit\nfrom hf_metagpt.engine import readahead\nseen = []\n_start = readahead.start\n"
            "def start(specs, **kw):\n    t = _start(specs, **kw)\n    t.join()\n"
            "    seen.append((list(specs), kw, 'torch' in sys.modules))\n    return t\n"
            "readahead.start = start\n"
            f"sys.argv = ['hf-metagpt', 'merge', '--base', {str(base)!r}, {str(fts[0])!r}, {str(fts[1])!r}, "
            f"'-o', {str(tmp_path / 'on')!r}, '-q', '--device', 'cpu']\n"
            "atexit.register(lambda: print(seen))\n"
            "runpy.run_module('hf_metagpt', run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env[READAHEAD_ENV] = "4096"  # on whatever the cores here (`wanted`)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    # the default merge (MetaGPT, model granularity) reads its pass 1 through the page cache
    assert f"[([{str(base)!r}, {str(fts[0])!r}, {str(fts[1])!r}], {{'cached_reads': True}}, False)]" in run.stdout
    off = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--base", str(base), *map(str, fts),
                          "-o", str(tmp_path / "off"), "-q", "--device", "cpu"],
                         capture_output=True, text=True, env=dict(env, **{READAHEAD_ENV: "0"}))
    assert off.returncode == 0, off.stderr
    outs = [{p.name: p.read_bytes() for p in (tmp_path / d).glob("*.safetensors")} for d in ("on", "off")]
    assert outs[0] and outs[0] == outs[1]


def test_a_hub_id_is_read_from_its_cached_snapshot_and_only_from_there(tiny_family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from helpers import copy_model
    from hf_metagpt.engine.readahead import input_folder

    base, _ = tiny_family(n_models=2)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = copy_model(base, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha + "\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert input_folder("org/name") == snapshot == input_folder(f"org/name@{sha}")
    assert input_folder("org/name@dev") is None  # a revision the cache does not record
    assert input_folder("org/other") is None and input_folder(f"org/name@{'f' * 40}") is None
    assert input_folder(str(base)) == base
    spans = plan_spans(["org/name", str(base)], 10**12)
    assert {s.path.split("/snapshots/")[0] for s in spans if "/snapshots/" in s.path} == {str(repo)}
    assert len(spans) == 2 * len([s for s in spans if s.path.startswith(str(base))])


def test_two_pass_names_the_methods_that_need_every_norm_first():
    from hf_metagpt.methods import METHODS

    norms = {name for name, make in METHODS.items() if getattr(make, "__self__", make).uses_group_norms}
    assert norms == set(readahead.NORM_METHODS)
    assert readahead.two_pass("metagpt", "model") and readahead.two_pass("metagpt_ties", "model")
    assert not readahead.two_pass("metagpt", "layer") and not readahead.two_pass("ties", "model")


def test_every_error_of_the_thread_is_swallowed_and_logged_at_debug(tiny_family, tmp_path, monkeypatch, caplog):
    import logging

    from helpers import copy_model

    base, _ = tiny_family(n_models=2)
    gone = copy_model(base, tmp_path / "gone")
    monkeypatch.setenv(READAHEAD_ENV, "64")
    spans = plan_spans([str(gone)], 10**12)
    for f in gone.glob("*.safetensors"):
        f.unlink()  # removed between the plan and the reads
    caplog.set_level(logging.DEBUG, logger="hf_metagpt.engine.readahead")
    with pytest.raises(FileNotFoundError):
        read_spans(spans)
    readahead._run([str(gone)], deadline=float("inf"))  # no index shards left: nothing read, no error
    monkeypatch.setattr(readahead, "plan_spans", lambda *a: spans)
    readahead._run([str(gone)], deadline=float("inf"))  # the reads fail: swallowed
    assert any("read-ahead stopped" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
