"""The engine's shape: a pure schedule, a ledger saved before shards, one owner for threads and the
work folder — and the defects the old shape hid ([engine]), each asserted on real merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.engine.ledger import PROGRESS_FILE
from hf_metagpt.engine.pieces import Piece, split_group
from hf_metagpt.engine.schedule import schedule
from hf_metagpt.engine.workdir import OutputLock
from hf_metagpt.errors import IncompatibleModelsError, NonFiniteError, OutputError

from helpers import copy_model, shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family(n_models=3)


def _args(base: Path, fts: list[Path], **kw) -> dict:
    return dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False,
                max_shard_size="40KB", **kw)


# ---------------------------------------------------------------- schedule: a pure function

def _pieces(plan, unit: int | None = None):
    infos = [plan.base, *plan.models]
    return [split_group(g, infos, unit or 1 << 30, slabs=True) for g in plan.groups]


def test_schedule_model_granularity_is_two_passes_and_merges_backwards(family):
    base, fts = family
    plan = hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], max_shard_size="40KB")
    s = schedule(plan, _pieces(plan), uses_norms=True, fused=True)
    assert s.passes == 2
    assert [st.piece.group.name for st in s.reduce_pass] == [g.name for g in plan.groups]
    assert all(not st.merge and st.reduce == {"model"} for st in s.reduce_pass)
    assert [st.piece.group.name for st in s.merge_pass] == [g.name for g in plan.groups][::-1]
    assert all(st.merge and not st.reduce for st in s.merge_pass)
    # Known norms (a rerun): no pass 1, plan order; finished shards are neither read nor written.
    done = frozenset({0, 1})
    again = schedule(plan, _pieces(plan), uses_norms=True, fused=True, known=frozenset({"model"}), done=done)
    assert again.passes == 1 and not again.reduce_pass
    written = {t.shard for st in again.merge_pass for t in st.write}
    assert written == set(range(len(plan.shards))) - done


def test_schedule_layer_granularity_reduces_inside_the_merge_step_or_first_when_cut(family):
    base, fts = family
    plan = hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], granularity="layer")
    s = schedule(plan, _pieces(plan), uses_norms=True, fused=True)
    assert s.passes == 1 and not s.reduce_pass
    for st in s.merge_pass:
        assert st.reduce == {t.norm_group for t in st.piece.tensors if t.floating} == st.finishes
    # A block cut into pieces: reduce steps first (the last one finishes the group), then merges.
    block = next(g for g in plan.groups if g.name == "layers.1")
    infos = [plan.base, *plan.models]
    cut = split_group(block, infos, 20_000, slabs=True)
    assert len(cut) > 2
    pieces = [cut if g is block else [Piece.whole(g)] for g in plan.groups]
    steps = [st for st in schedule(plan, pieces, uses_norms=True, fused=True).merge_pass if st.piece.group is block]
    reduce = [st for st in steps if not st.merge]
    assert reduce and all(st.reduce == {"layers.1"} for st in reduce)
    assert [st.finishes for st in reduce] == [frozenset()] * (len(reduce) - 1) + [frozenset({"layers.1"})]
    assert [st.merge for st in steps] == [False] * len(reduce) + [True] * len(cut)
    assert all(not st.reduce for st in steps if st.merge)


def test_schedule_splits_shards_between_processes(family):
    base, fts = family
    plan = hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], max_shard_size="40KB")
    owners = [0 if k < len(plan.shards) // 2 else 1 for k in range(len(plan.shards))]
    mine = [schedule(plan, _pieces(plan), uses_norms=True, fused=True, owners=owners, process=p) for p in (0, 1)]
    assert all(s.passes == 2 for s in mine)
    orders = sorted(st.order for s in mine for st in s.reduce_pass)
    assert orders == list(range(len(plan.groups)))  # every group reduced once, numbered across processes
    for p, s in enumerate(mine):
        assert {t.shard for st in s.merge_pass for t in st.write} == {k for k, o in enumerate(owners) if o == p}


# ---------------------------------------------------------------- the ledger and resume

def test_nonfinite_input_is_refused_after_a_run_that_allowed_it(family, tmp_path):
    base, fts = family
    bad = copy_model(fts[1], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[1]
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    hf_metagpt.merge(output=str(out), allow_nonfinite=True, **_args(base, [fts[0], bad, fts[2]]))
    # The norms of that run must not be reused: without the flag the NaN is refused, naming it.
    with pytest.raises(NonFiniteError, match=name):
        hf_metagpt.merge(output=str(out), overwrite=True, **_args(base, [fts[0], bad, fts[2]]))
    assert (out / "model.safetensors.index.json").is_file()  # the earlier output is untouched


def _crash_after_renames(monkeypatch, n: int) -> None:
    """Raise (as a kill would stop the run) right after the n-th shard is renamed into place."""
    real = Path.rename
    count = {"n": 0}

    def rename(self, target):
        out = real(self, target)
        if str(self).endswith(".safetensors.tmp"):
            count["n"] += 1
            if count["n"] == n:
                raise KeyboardInterrupt("killed after a shard's rename")
        return out

    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize("granularity", ["layer", "tensor", "model"])
def test_a_kill_right_after_a_shard_is_renamed_loses_no_coefficient(family, tmp_path, monkeypatch, granularity):
    base, fts = family
    # Shards of several blocks each: the groups of the second shard are complete only in it.
    args = dict(_args(base, fts, granularity=granularity), max_shard_size="150KB")
    clean = hf_metagpt.merge(output=str(tmp_path / "clean"), **args)
    _crash_after_renames(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    monkeypatch.undo()
    progress = json.loads((tmp_path / ".out.hf-metagpt-partial" / PROGRESS_FILE).read_text())
    assert len(progress["shards"]) == 2  # both renamed shards were recorded before their rename
    result = hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    assert result.stats.shards_reused == 2
    assert result.coefficients == clean.coefficients  # every group, the same λ
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")
    from hf_metagpt.evaluation.verify import verify

    report = verify(tmp_path / "out", against=[str(base), *map(str, fts)])  # raises when anything is off
    assert report.recomputed


def test_resume_rewrites_a_finished_shard_whose_bytes_changed(family, tmp_path, monkeypatch):
    base, fts = family
    args = _args(base, fts)
    hf_metagpt.merge(output=str(tmp_path / "clean"), **args)
    _crash_after_renames(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    monkeypatch.undo()
    work = tmp_path / ".out.hf-metagpt-partial"
    victim = sorted(work.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0xFF  # same header, same size: only the content says it is not ours
    victim.write_bytes(bytes(data))
    result = hf_metagpt.merge(output=str(tmp_path / "out"), **args)
    assert result.stats.shards_reused == 2
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")


def test_a_second_merge_into_a_locked_output_stops_at_once_naming_the_holder(family, tmp_path):
    base, fts = family
    out = tmp_path / "out"
    with OutputLock(out):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", *map(str, fts), "--base", str(base),
                               "-o", str(out), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert f"Another merge (process {os.getpid()}) is writing {out.resolve()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 60 and not out.exists() and not (tmp_path / ".out.hf-metagpt-partial").exists()
    # Once the holder is gone the same command runs.
    hf_metagpt.merge(output=str(out), **_args(base, fts))
    assert (out / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------- checks before the first weight

def test_architecture_mismatch_of_local_inputs_is_refused_before_any_weight_is_read(family, tmp_path, monkeypatch):
    base, fts = family
    bad = copy_model(base, tmp_path / "base-bad-config")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2  # the weights say otherwise
    (bad / "config.json").write_text(json.dumps(cfg))
    for ft in fts:
        c = json.loads((ft / "config.json").read_text())
        assert c["intermediate_size"] * 2 == cfg["intermediate_size"]
    from hf_metagpt.engine import feed, tasks

    def no_reads(*a, **k):
        raise AssertionError("a weight was read before the architecture check")

    monkeypatch.setattr(tasks, "read_metas", no_reads)
    monkeypatch.setattr(feed, "read_metas", no_reads)
    fake_fts = []
    for k, ft in enumerate(fts):
        f = copy_model(ft, tmp_path / f"ft{k}")
        (f / "config.json").write_text(json.dumps(cfg))
        fake_fts.append(f)
    with pytest.raises(IncompatibleModelsError, match="config implies"):
        hf_metagpt.merge(output=str(tmp_path / "out"), **_args(bad, fake_fts))
    assert not (tmp_path / ".out.hf-metagpt-partial").exists()


def test_gpt2_config_without_tie_word_embeddings_is_read_as_transformers_reads_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    folders = []
    for k in range(3):
        model = GPT2LMHeadModel(cfg)
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01 * k)
        folder = tmp_path / f"gpt2-{k}"
        model.save_pretrained(folder)
        c = json.loads((folder / "config.json").read_text())
        c.pop("tie_word_embeddings", None)  # as in the original GPT-2 configs on the Hub
        (folder / "config.json").write_text(json.dumps(c))
        folders.append(folder)
    result = hf_metagpt.merge(output=str(tmp_path / "out"), **_args(folders[0], folders[1:]))
    assert set(result.coefficients) == {"model"}
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # the tie kept


def test_layer_granularity_that_falls_back_is_recorded_as_tensor(tmp_path):
    folders = []
    for k in range(3):
        f = tmp_path / f"m{k}"
        f.mkdir()
        (f / "config.json").write_text(json.dumps({"model_type": "hf-metagpt-unknown", "dtype": "float32"}))
        g = torch.Generator().manual_seed(k)
        save_file({"encoder.w": torch.randn(4, 4, generator=g), "head.w": torch.randn(4, generator=g)},
                  f / "model.safetensors", metadata={"format": "pt"})
        folders.append(f)
    result = hf_metagpt.merge(output=str(tmp_path / "out"), granularity="layer",
                              **_args(folders[0], folders[1:]))
    assert result.granularity == "tensor"
    assert set(result.coefficients) == {"encoder.w", "head.w"}
    coef = json.loads((tmp_path / "out" / "metagpt_coefficients.json").read_text())
    assert coef["granularity"] == "tensor"
    assert any("falls back to tensor" in w for w in result.warnings)


def test_float16_output_that_overflows_stops_naming_the_tensor(tmp_path):
    spec = TinySpec(dtype=torch.bfloat16)
    base, fts = build_family(tmp_path / "fam", n_models=2, spec=spec)
    for folder in [base, *fts]:
        for shard in folder.glob("*.safetensors"):
            tensors = load_file(shard)
            if "model.norm.weight" in tensors:
                tensors["model.norm.weight"] = tensors["model.norm.weight"] + 70000.0  # fits bf16, not fp16
                save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(OutputError, match=r"model\.norm\.weight.*exceed the range"):
        hf_metagpt.merge(output=str(tmp_path / "out"), dtype="float16", **_args(base, fts))
    assert not (tmp_path / "out").exists()


def test_plan_needs_no_output(family):
    base, fts = family
    plan = hf_metagpt.plan(base=str(base), models=[str(f) for f in fts])
    assert plan.two_pass and len(plan.models) == 3 and "granularity=model" in plan.describe()


def test_an_output_that_cannot_be_written_is_refused_before_the_merge(family, tmp_path, monkeypatch):
    base, fts = family
    # A parent on a file system that cannot hold it (as root, permission bits would not stop us).
    with pytest.raises(OutputError, match="Cannot write beside the output"):
        hf_metagpt.merge(output="/proc/hf-metagpt-test/out", **_args(base, fts))
    # A mount point cannot be swapped for the finished folder: refused first, not after the merge.
    from hf_metagpt.engine import workdir

    target = (tmp_path / "mnt").resolve()
    target.mkdir()
    monkeypatch.setattr(workdir.os.path, "ismount", lambda p: Path(p) == target)
    with pytest.raises(OutputError, match="is a mount point"):
        hf_metagpt.merge(output=str(target), **_args(base, fts))
    assert not (tmp_path / ".mnt.hf-metagpt-partial").exists()


# ---------------------------------------------------------------- the executor's seams

class _MemorySink:
    """A sink of the test's own: the merged tensors in memory (what a GPU or parallel sink plugs into)."""

    writes = True
    bytes_written = 0
    energy = None

    def __init__(self) -> None:
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.calls: list[str] = []
        from hf_metagpt.engine.timeline import Meter

        self.busy, self.sync = Meter(), Meter()  # the protocol's time account (nothing of its own to time)

    def finished(self) -> set[int]:
        return set()

    def open(self) -> None:
        self.calls.append("open")

    def alloc(self, step):
        return lambda shape, dtype: torch.empty(shape, dtype=dtype)

    def write(self, step, outs, ledger) -> None:
        for tp, out in zip(step.write, outs):
            self.tensors.setdefault(tp.name, []).append(out.clone())

    def finish(self, ledger) -> None:
        self.calls.append("finish")

    def abort(self) -> None:
        self.calls.append("abort")


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_executor_runs_plan_kernel_feed_and_a_foreign_sink(family, tmp_path, granularity):
    """Executor(plan, kernel, feed, sink).run(): a sink of another kind gets the very tensors the
    shard sink writes, and the RunResult holds the merge's λ and counters."""
    from hf_metagpt.engine.executor import Executor
    from hf_metagpt.engine.feed import PieceFeed
    from hf_metagpt.engine.fetch import LocalFiles
    from hf_metagpt.engine.ledger import NormLedger
    from hf_metagpt.engine.merging import build_kernel, sources_of
    from hf_metagpt.engine.pieces import unit_bytes
    from hf_metagpt.methods import get_method

    base, fts = family
    the_plan = hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], granularity=granularity)
    method = get_method("metagpt")
    cpu = torch.device("cpu")
    files = LocalFiles()
    sources = sources_of(the_plan, files, cpu)
    sink = _MemorySink()
    kernel = build_kernel(the_plan, method, sources, cpu)
    feed = PieceFeed(the_plan, sources, files, unit_bytes(), local=True)
    run = Executor(the_plan, kernel, feed, sink, ledger=NormLedger(len(the_plan.models)), progress=False).run()
    merged = hf_metagpt.merge(output=str(tmp_path / "out"), granularity=granularity, **_args(base, fts))
    assert sink.calls == ["open", "finish"]
    assert dict(run.coefficients) == merged.coefficients and run.precision == merged.precision == "float64"
    assert run.stats.passes == merged.stats.passes == (2 if granularity == "model" else 1)
    assert run.stats.bytes_read == merged.stats.bytes_read > 0 and run.stats.bytes_written == 0
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    assert set(sink.tensors) == set(written)
    for name, parts in sink.tensors.items():
        assert torch.equal(torch.cat(parts) if len(parts) > 1 else parts[0], written[name]), name
