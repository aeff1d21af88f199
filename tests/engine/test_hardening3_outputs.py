"""What a merge writes, publishes, replaces and reuses: only its own files, only its own norms.

Side files never follow a link out of their model; publishing never deletes what appeared in the
output while the merge ran; `--overwrite` replaces only a folder of a merge's files; a rerun reuses
only the norms this tool kept in its own cache (with their checksum), never a folder's
metagpt_coefficients.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_metagpt
from hf_metagpt.demo.tiny import build_family
from hf_metagpt.engine import workdir
from hf_metagpt.errors import InputError, OutputError
from helpers import copy_model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("h3out")
    base, fts = build_family(root, n_models=2)
    return root, base, fts


def _args(base: Path, fts: list[Path], **kw) -> dict:
    return dict(base=str(base), models=[str(f) for f in fts], device="cpu", progress=False, **kw)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", *args], capture_output=True, text=True,
                          timeout=300, env=env)


# ------------------------------------------------------------------ side files stay inside their model

@pytest.mark.parametrize("name", ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"])
def test_side_file_linked_outside_the_model_is_refused_before_any_weight_is_read(family, tmp_path, name):
    root, base, fts = family
    secret = tmp_path / "secret.txt"
    secret.write_text('{"api_key": "do-not-push"}')
    linked = copy_model(base, tmp_path / "linked-base")
    (linked / name).unlink(missing_ok=True)
    (linked / name).symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        hf_metagpt.merge(output=str(out), **_args(linked, fts))
    assert name in err.value.message and "outside the model folder" in err.value.message
    assert str(secret) in err.value.message and "Copy the file into the model folder" in err.value.hint
    assert not out.exists() and not (tmp_path / ".out.hf-metagpt-partial").exists()


def test_side_file_linked_outside_the_model_is_refused_by_the_cli(family, tmp_path):
    root, base, fts = family
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    linked = copy_model(base, tmp_path / "linked")
    (linked / "tokenizer.model").symlink_to(secret)
    proc = _cli("merge", "--base", str(linked), *map(str, fts), "--output", str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "tokenizer.model is a link to" in proc.stderr and "hint:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_side_file_linked_inside_the_model_or_into_hub_blobs_is_copied(family, tmp_path):
    root, base, fts = family
    # A local folder laid out like the Hub cache: snapshots/<sha>/NAME -> ../../blobs/<hash>
    repo = tmp_path / "models--org--base"
    snap = repo / "snapshots" / ("a" * 40)
    copy_model(base, snap)
    blobs = repo / "blobs"
    blobs.mkdir()
    (blobs / "b1").write_text((base / "tokenizer_config.json").read_text())
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(Path("..", "..", "blobs", "b1"))
    (snap / "sub").mkdir()
    (snap / "sub" / "gen.json").write_text('{"bos_token_id": 7, "max_length": 33}')
    (snap / "generation_config.json").unlink()
    (snap / "generation_config.json").symlink_to(Path("sub", "gen.json"))
    out = tmp_path / "out"
    hf_metagpt.merge(output=str(out), **_args(snap, fts))
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert not (out / "tokenizer_config.json").is_symlink()
    assert (out / "generation_config.json").read_bytes() == b'{"bos_token_id": 7, "max_length": 33}'  # as it was


@pytest.mark.parametrize("content,needle", [("[1, 2]", "holds a list, not a JSON object"),
                                            ("PRIVATE KEY", "is not valid JSON")])
def test_generation_config_that_is_not_a_json_object_is_refused(family, tmp_path, content, needle):
    root, base, fts = family
    bad = copy_model(base, tmp_path / "bad-gen")
    (bad / "generation_config.json").write_text(content)
    with pytest.raises(InputError) as err:
        hf_metagpt.merge(output=str(tmp_path / "out"), **_args(bad, fts))
    assert "generation_config.json" in err.value.message and needle in err.value.message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ publish never deletes what it does not own

def _fill_during_merge(monkeypatch, make):
    """Run `make()` after the shards are written, before the finished merge is published."""
    import hf_metagpt.api as api

    real = api.write_side_files

    def write_then_fill(plan, work):
        make()
        return real(plan, work)

    monkeypatch.setattr(api, "write_side_files", write_then_fill)


def test_file_created_in_the_output_during_the_merge_is_kept(family, tmp_path, monkeypatch):
    root, base, fts = family
    out = tmp_path / "out"
    notes = out / "notes.txt"
    _fill_during_merge(monkeypatch, lambda: (out.mkdir(), notes.write_text("mine")))
    with pytest.raises(OutputError) as err:
        hf_metagpt.merge(output=str(out), **_args(base, fts))
    assert "is not empty (it was filled while the merge ran)" in err.value.message
    assert "The finished merge is kept in" in err.value.hint
    assert notes.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # The finished merge waits in the work folder: moving notes.txt away and rerunning resumes from it.
    monkeypatch.undo()
    notes.unlink()
    again = hf_metagpt.merge(output=str(out), **_args(base, fts))
    assert again.stats.shards_reused == len(list(out.glob("model*.safetensors"))) > 0
    assert again.stats.passes == 1


def test_other_merge_finished_into_the_output_during_the_merge_is_kept(family, tmp_path, monkeypatch):
    root, base, fts = family
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    hf_metagpt.merge(output=str(clean), **_args(base, fts))

    def other_merge():
        import shutil
        shutil.copytree(clean, out / "sub")

    _fill_during_merge(monkeypatch, other_merge)
    with pytest.raises(OutputError):
        hf_metagpt.merge(output=str(out), **_args(base, fts[:1]))
    assert sorted(p.name for p in (out / "sub").iterdir()) == sorted(p.name for p in clean.iterdir())


def test_file_created_in_the_output_during_a_cli_merge_is_kept(family, tmp_path):
    root, base, fts = family
    out = tmp_path / "out"
    work = tmp_path / ".out.hf-metagpt-partial"
    # The child sleeps 0.3 s after each finished shard (patched here: no test hook in the package).
    slow = ("import sys, time; from hf_metagpt.engine import writer; close = writer.ShardWriter.close; "
            "writer.ShardWriter.close = lambda self: (close(self), time.sleep(0.3))[0]; "
            "from hf_metagpt.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow, "-q", "merge", "--base", str(base),
                             *map(str, fts), "--output", str(out), "--max-shard-size", "20KB", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(work.glob("model-*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "filled while the merge ran" in stderr and "Traceback" not in stderr
    assert (out / "notes.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ --overwrite replaces only a merge's files

@pytest.mark.parametrize("entry", [".git/", "notes.txt", "src/"])
def test_overwrite_refuses_a_folder_that_is_not_a_merge_output(family, tmp_path, entry):
    root, base, fts = family
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text("{}")  # looks a little like a model, but holds more
    if entry.endswith("/"):
        (out / entry).mkdir()
        (out / entry / "HEAD").write_text("ref: refs/heads/main\n")
    else:
        (out / entry).write_text("keep me")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    proc = _cli("merge", "--base", str(base), *map(str, fts), "--output", str(out), "--overwrite", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert f"holds {entry}, which a merge does not write" in proc.stderr and "Traceback" not in proc.stderr
    assert "move those entries away" in proc.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_overwrite_replaces_a_previous_merge(family, tmp_path):
    root, base, fts = family
    out = tmp_path / "out"
    hf_metagpt.merge(output=str(out), **_args(base, fts[:1]))
    hf_metagpt.merge(output=str(out), overwrite=True, **_args(base, fts))
    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert len(coeffs["groups"]["model"]["lambdas"]) == 2


# ------------------------------------------------------------------ norms are reused only from this tool's ledger

def test_rerun_ignores_norms_planted_in_the_outputs_coefficients_file(family, tmp_path):
    root, base, fts = family
    out = tmp_path / "out"
    fts3 = fts + [copy_model(fts[0], tmp_path / "ft3")]
    first = hf_metagpt.merge(output=str(out), **_args(base, fts3))
    path = out / "metagpt_coefficients.json"
    data = json.loads(path.read_text())
    data["groups"]["model"]["sq_norms"] = [-5000.0, 1.0, 10000.0]
    path.write_text(json.dumps(data))
    workdir.norms_file_for(out, first.norms_key).unlink()  # as for a folder downloaded from the Hub: no ledger kept
    again = hf_metagpt.merge(output=str(out), overwrite=True, **_args(base, fts3))
    assert again.stats.passes == 2
    assert again.coefficients == first.coefficients
    assert all(0 <= x <= 1 for x in again.coefficients["model"])


@pytest.mark.parametrize("tamper", ["negative", "checksum", "nan"])
def test_rerun_refuses_a_tampered_or_invalid_kept_ledger(family, tmp_path, tamper):
    root, base, fts = family
    out = tmp_path / "out"
    first = hf_metagpt.merge(output=str(out), **_args(base, fts))
    path = workdir.norms_file_for(out, first.norms_key)
    data = json.loads(path.read_text())
    assert set(data) >= {"key", "sq_norms", "grams", "sha256"}
    data.pop("sha256")
    data["sq_norms"]["model"] = [-5000.0, 10000.0] if tamper != "nan" else [float("nan"), 1.0]
    stamped = {**data, "sha256": workdir.digest(data) if tamper != "checksum" else "0" * 64}
    path.write_text(json.dumps(stamped))
    again = hf_metagpt.merge(output=str(out), overwrite=True, **_args(base, fts))
    assert again.stats.passes == 2
    assert again.coefficients == first.coefficients


def test_rerun_reuses_the_intact_kept_ledger(family, tmp_path):
    root, base, fts = family
    out = tmp_path / "out"
    first = hf_metagpt.merge(output=str(out), **_args(base, fts))
    assert not any(p.name.startswith(".") for p in [*out.iterdir(), *tmp_path.iterdir()])  # kept outside
    assert workdir.norms_file_for(out, first.norms_key).is_file()
    again = hf_metagpt.merge(output=str(out), overwrite=True, **_args(base, fts))
    assert again.stats.passes == 1 and again.coefficients == first.coefficients
