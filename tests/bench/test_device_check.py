"""bench/device_check.py: every hf-metagpt row records its time account, and the second table shows it."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _rows(dc, models: list[Path], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)  # (the mergekit rows' recipe is written there)
    return dc.rows_for(models, out, False, (None, {}, "no mergekit"))


def _measurable(dc, tiny_family, tmp_path: Path) -> tuple[list[Path], object, list[dict]]:
    """A tiny family's input files, a Check with 300 s of budget, and the rows to measure on it."""
    base, fts = tiny_family(n_models=2)
    models = [base, *fts]
    inputs = [f for m in models for f in dc.bench.shard_files(m)]
    return inputs, dc.Check(tmp_path / "results", budget=300), _rows(dc, models, tmp_path / "out")


@pytest.fixture()
def dc(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # device_check imports bench/run.py by name
    return importlib.import_module("device_check")


def test_low_priority_rows_are_marked_with_their_modes(dc, tmp_path):
    models = [tmp_path / n for n in ("base", "task_a", "task_b")]
    rows = _rows(dc, models, tmp_path / "out")
    low = [r for r in rows if r.get("low")]
    assert [r["name"] for r in low] == ["mergekit 0.1.5 task_arithmetic --gpu-rich --async-write",
                                        "hf-metagpt --device cuda --granularity model, HF_METAGPT_GPU_STAGING=1",
                                        "hf-metagpt --device cpu --granularity model --workers 4",
                                        "hf-metagpt --device cpu --granularity model --num-processes 4",
                                        "hf-metagpt --device cpu --granularity layer, HF_METAGPT_READAHEAD_MB=0"]
    once = [r for r in rows if r.get("once")]
    assert [r["name"] for r in once] == [f"mergekit 0.1.5 task_arithmetic {m}" for m in
                                         ("CPU", "--cuda", "--gpu-rich --async-write")]
    assert [r.get("modes", ("cold", "warm")) for r in once] == [("cold", "warm"), ("cold",), ("cold", "warm")]
    assert all(r["modes"] == ("warm",) for r in low[1:4])
    assert low[1]["skip"] == "no CUDA" and not any(r["skip"] for r in low[2:])
    low = low[2:]
    assert low[2]["modes"] == ("cold",) and low[2]["env"]["HF_METAGPT_READAHEAD_MB"] == "0"
    from hf_metagpt.constants import READAHEAD_ENV

    assert dc.READAHEAD_ENV == READAHEAD_ENV
    assert low[0]["argv"][low[0]["argv"].index("--workers") + 1] == "4"
    assert low[1]["argv"][low[1]["argv"].index("--num-processes") + 1] == "4"
    assert "--device" in low[1]["argv"] and low[1]["argv"][low[1]["argv"].index("--device") + 1] == "cpu"


@pytest.mark.parametrize("repeat", [1, 3])
def test_rounds_time_mergekit_once_profile_after_the_first_and_low_rows_after_the_second(dc, tmp_path, monkeypatch,
                                                                                      repeat):
    calls = []
    monkeypatch.setattr(dc, "measure", lambda chk, row, mode, *a: calls.append(f"{row['name']} {mode}"))
    monkeypatch.setattr(dc, "floor", lambda *a: calls.append("floor") or (1.0, 1.0))
    monkeypatch.setattr(dc, "drop_caches", lambda *a: "evict")
    monkeypatch.setattr(dc, "warm", lambda *a: None)
    monkeypatch.setattr(dc, "gil_check", lambda *a: calls.append("gil") or "GIL line")
    rows = [{"name": "hf", "skip": ""}, {"name": "mk", "skip": "", "once": True},
            {"name": "low", "skip": "", "low": True, "modes": ("warm",)}, {"name": "skipped", "skip": "no CUDA"}]
    f = tmp_path / "in"
    f.write_bytes(b"x")
    chk = dc.Check(tmp_path / "res", 100)
    assert dc.rounds(chk, rows, [f], 1, tmp_path, repeat, False) == "GIL line"
    first = ["floor", "floor", "hf cold", "hf warm", "mk cold", "mk warm", "gil"]
    later = ["floor", "floor", "hf cold", "hf warm"]
    assert calls == (first + ["low warm"] if repeat == 1 else first + later + ["low warm"] + later)


def test_a_measured_row_keeps_its_time_account_and_the_table_shows_it(dc, tiny_family, tmp_path):
    inputs, chk, rows = _measurable(dc, tiny_family, tmp_path)
    row = next(r for r in rows if r["name"] == "hf-metagpt --device cpu --granularity model")
    rec = dc.measure(chk, row, "warm", inputs, False)
    assert rec["ok"], rec
    tl = rec["timeline"]
    assert set(tl["phases"]) == {"startup", "prepare", "loop", "finish"}
    assert 0 < tl["wall"] <= rec["wall_s"]
    assert tl["phases"]["loop"] > 0 and tl["busy"]["writer"]["count"] > 0
    assert not (chk.out / "timeline.json").exists()  # read into the record, then removed
    text = dc.time_table(chk, rows)
    lines = text.splitlines()
    assert lines[0] == "### where the time went (warm runs, seconds, medians)"
    mine = [x for x in lines if x.startswith(f"| {row['name']} |")]
    assert len(mine) == 1
    cells = [c.strip() for c in mine[0].strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(rec["wall_s"], abs=0.05)
    assert float(cells[4]) == pytest.approx(tl["phases"]["loop"], abs=0.05)
    assert float(cells[6]) == pytest.approx(rec["wall_s"] - tl["wall"], abs=0.05)  # outside the account
    assert cells[10].endswith(f"×{tl['threads']['workers']}")


def test_no_time_table_without_accounts(dc, tmp_path):
    chk = dc.Check(tmp_path / "results", budget=10)
    rows = _rows(dc, [tmp_path / "b", tmp_path / "t"], tmp_path / "out")
    assert dc.time_table(chk, rows) == ""


def test_the_first_warm_run_of_each_row_is_traced_into_one_file(dc, tiny_family, tmp_path):
    inputs, chk, rows = _measurable(dc, tiny_family, tmp_path)
    model, layer = (next(r for r in rows if r["name"] == f"hf-metagpt --device cpu --granularity {g}")
                    for g in ("model", "layer"))
    recs = [dc.measure(chk, model, "cold", inputs, False), dc.measure(chk, model, "warm", inputs, False),
            dc.measure(chk, model, "warm", inputs, False), dc.measure(chk, layer, "warm", inputs, False)]
    assert all(r["ok"] for r in recs), recs
    from hf_metagpt.constants import TRACE_ENV

    assert dc.TRACE_ENV == TRACE_ENV
    assert sorted(p.name for p in chk.out.iterdir()) == ["device_check.jsonl", "device_check.log", "traces.json"]
    whole = json.loads((chk.out / "traces.json").read_text())
    # the cold run and the second warm run are not traced: one process per row, named after it
    assert list(whole["otherData"]) == [model["name"], layer["name"]]
    names = {e["pid"]: e["args"]["name"] for e in whole["traceEvents"] if e["name"] == "process_name"}
    assert names == {1: f"{model['name']} (warm)", 2: f"{layer['name']} (warm)"}
    for pid, rec in ((1, recs[1]), (2, recs[3])):
        spans = [e for e in whole["traceEvents"] if e["pid"] == pid and e["ph"] == "X"]
        assert sum(e["name"] == "job" for e in spans) == rec["timeline"]["busy"]["workers"]["count"] > 0
        assert sum(e["name"] == "write" for e in spans) == rec["timeline"]["busy"]["writer"]["count"] > 0
        assert whole["otherData"][rec["row"]]["concurrency"]["workers"]["of"] == rec["timeline"]["threads"]["workers"]
    line = next(x for x in dc.time_table(chk, rows).splitlines() if x.startswith(f"| {layer['name']} |"))
    c = recs[3]["timeline"]["concurrency"]
    assert line.endswith(f"| {c['readers']['mean']:.2f} / {c['workers']['mean']:.2f} "
                         f"({c['no_worker']['seconds']:.1f}) |")


def test_the_gpu_staging_rows_compare_their_bytes_with_the_plain_cuda_rows(dc, tmp_path):
    """GPU staging (engine/staging.py) is timed beside the plain CUDA merge and its bytes compared."""
    from hf_metagpt.constants import GPU_STAGING_ENV

    assert dc.GPU_STAGING_ENV == GPU_STAGING_ENV
    models = [tmp_path / n for n in ("base", "task_a", "task_b")]
    rows = {r["name"]: r for r in _rows(dc, models, tmp_path / "out")}
    staged = rows["hf-metagpt --device cuda --granularity layer, HF_METAGPT_GPU_STAGING=1"]
    plain = rows[staged["same_as"]]
    assert plain["name"] == "hf-metagpt --device cuda --granularity layer" and plain["digest"] and staged["digest"]
    assert staged["env"][GPU_STAGING_ENV] == "1" and GPU_STAGING_ENV not in plain["env"]
    assert staged["argv"][staged["argv"].index("--device") + 1] == "cuda" and not staged.get("low")
    staged["sha256"], plain["sha256"] = "a", "a"
    chk = dc.Check(tmp_path / "res", 10)
    text = dc.table(chk, list(rows.values()), {"title": "t", "machine_line": "m"})
    assert f"- {staged['name']}: the same bytes as {plain['name']}" in text
    staged["sha256"] = "b"
    text = dc.table(chk, list(rows.values()), {"title": "t", "machine_line": "m"})
    assert f"- {staged['name']}: OTHER bytes than {plain['name']}" in text
    assert "spans copied on the reader thread" not in text  # no run of it yet
    chk.record(kind="run", row=staged["name"], ok=True, mode="warm", wall_s=1.0, user_s=1.0, peak_rss_gb=1.0,
               timeline={"staging": {"copied": 27, "hits": 108, "misses": 0}})
    text = dc.table(chk, list(rows.values()), {"title": "t", "machine_line": "m"})
    assert (f"- {staged['name']}: 27 spans copied on the reader thread; the kernel found 108 inputs staged "
            f"and copied 0 itself") in text


def test_the_chunk_row_comes_last_and_merges_like_the_default_layer_row(dc, tmp_path):
    from hf_metagpt.constants import MERGE_CHUNK_ENV

    models = [tmp_path / n for n in ("base", "task_a", "task_b")]
    assert dc.MERGE_CHUNK_ENV == MERGE_CHUNK_ENV
    plain = _rows(dc, models, tmp_path / "out")
    rows = dc.rows_for(models, tmp_path / "out", False, (None, {}, "no mergekit"), 1 << 16)
    assert [r["name"] for r in rows[:-1]] == [r["name"] for r in plain]
    row, default = rows[-1], next(r for r in rows if r["name"] == "hf-metagpt --device cpu --granularity layer")
    assert row["name"] == "hf-metagpt --device cpu --granularity layer, HF_METAGPT_MERGE_CHUNK=65536"
    assert row["low"] and row["modes"] == ("warm",) and row["env"][MERGE_CHUNK_ENV] == "65536"
    assert row["same_as"] == default["name"] and row["digest"] and default["digest"]
    i = default["argv"].index("--output")
    assert row["argv"][:i + 1] == default["argv"][:i + 1] and row["argv"][i + 2:] == default["argv"][i + 2:]
    assert row["argv"][i + 1] == str(row["output"]) != default["argv"][i + 1]
    assert not next(r for r in plain if r["name"] == default["name"]).get("digest")  # no chunk row: not digested


def test_the_chunk_row_gives_the_default_rows_bytes_and_the_report_says_so(dc, tiny_family, tmp_path):
    base, fts = tiny_family(n_models=2)
    models = [base, *fts]
    inputs = [f for m in models for f in dc.bench.shard_files(m)]
    chk = dc.Check(tmp_path / "results", budget=300)
    (tmp_path / "out").mkdir()
    rows = dc.rows_for(models, tmp_path / "out", False, (None, {}, "no mergekit"), 4096)
    for name in ("hf-metagpt --device cpu --granularity layer", rows[-1]["name"]):
        row = next(r for r in rows if r["name"] == name)
        rec = dc.measure(chk, row, "warm", inputs, False)
        assert rec["ok"] and len(rec["sha256"]) == 64, rec
    assert rows[-1]["sha256"] == next(r for r in rows if r["name"] == rows[-1]["same_as"])["sha256"]
    text = dc.table(chk, rows, {"title": "t", "machine_line": "m"})
    assert ("- hf-metagpt --device cpu --granularity layer, HF_METAGPT_MERGE_CHUNK=4096: the same bytes as "
            "hf-metagpt --device cpu --granularity layer\n") in text
    rows[-1]["sha256"] = "0" * 64
    assert ": OTHER bytes than hf-metagpt --device cpu --granularity layer" in dc.table(chk, rows, {"title": "t",
                                                                                                "machine_line": "m"})


def test_kernel_scaling_step_keeps_its_json_and_table(dc, tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "SCALING_S", 5.0)
    chk = dc.Check(tmp_path / "results", budget=300)
    text, chunk = dc.kernel_scaling(chk, small=True)
    rep = json.loads((chk.out / "kernel_scaling.json").read_text())
    assert rep["bit_identical"] is True and rep["elements"] < 1 << 24
    assert text == rep["table"] and text.startswith("### kernel scaling")
    best = rep["best"]
    clearly = best["wall_s"] < (1 - dc.CHUNK_GAIN) * best["default_wall_s"]
    assert chunk == (best["chunk"] if best["chunk"] != best["default_chunk"] and clearly else None)
    rec = [r for r in chk.records if r.get("kind") == "kernel_scaling"]
    assert len(rec) == 1 and rec[0]["bit_identical"] is True and rec[0]["best"] == best


def test_kernel_scaling_step_is_skipped_when_it_does_not_fit(dc, tmp_path):
    chk = dc.Check(tmp_path / "results", budget=30)
    assert dc.kernel_scaling(chk, small=True) == ("", None)
    assert chk.records[-1] == {"t": chk.records[-1]["t"], "kind": "kernel_scaling", "skipped": "budget"}
    assert not (chk.out / "kernel_scaling.json").exists()


def test_a_hung_run_is_killed_with_its_children_and_reported(dc):
    """bench.timed's timeout (device_check passes one to every run): the command and what it started
    are killed, the run fails with a note saying so, and the wall is the timeout, not the hang."""
    import psutil

    marker = "61.25"  # a sleep only this test starts
    run = dc.bench.timed("hang", ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"], timeout=1.0)
    assert not run.ok and run.note == "timed out after 1 s (killed)" and run.wall_s < 15
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
    assert left == []
    assert dc.bench.timed("quick", ["true"], timeout=30.0).ok


@pytest.mark.parametrize("wall, row", [(0.090, True), (0.097, False)])
def test_the_sweeps_chunk_gets_a_merge_row_only_when_clearly_faster(dc, tmp_path, monkeypatch, wall, row):
    """A chunk within the sweep's noise of the default (under CHUNK_GAIN faster) is not worth a full merge."""
    best = {"threads": 16, "chunk": 1 << 19, "wall_s": wall, "default_chunk": 1 << 18, "default_wall_s": 0.100}

    def fake_run(argv, **kw):
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"best": best, "table": "### kernel scaling", "bit_identical": True,
                                   "skipped": [], "elements": 1}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(dc.subprocess, "run", fake_run)
    chk = dc.Check(tmp_path / "results", budget=300)
    assert dc.kernel_scaling(chk, small=True) == ("### kernel scaling", (1 << 19) if row else None)
