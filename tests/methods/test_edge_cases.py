"""MetaGPT's edge cases (docs/method.md) and the clear errors of bad inputs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.cli import main as cli_main
from hf_metagpt.demo.tiny import TinySpec, build_family
from helpers import add_tokens, copy_model, run_cli
from reference import assert_within_ulp, load_state, reference_metagpt


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    base, fts = build_family(root, n_models=2)
    return root, base, fts



def _edit_tensor(folder: Path, name: str, fn) -> None:
    """Rewrite the shard holding `name` with fn(tensor) (None removes it)."""
    wm = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / wm["weight_map"][name]
    tensors = load_file(file)
    new = fn(tensors[name])
    if new is None:
        del tensors[name]
        del wm["weight_map"][name]
        (folder / "model.safetensors.index.json").write_text(json.dumps(wm))
    else:
        tensors[name] = new
    save_file(tensors, file, metadata={"format": "pt"})



# ------------------------------------------------------------------ bad inputs: message, exit, nothing left

Q = "model.layers.1.self_attn.q_proj.weight"


def _bad_cases(root: Path, base: Path, ft: Path):
    other = root / "other"
    if not other.exists():
        build_family(other, n_models=0, spec=TinySpec(hidden_size=32))
        build_family(root / "shallow", n_models=0, spec=TinySpec(num_hidden_layers=3))
        _edit_tensor(copy_model(ft, root / "missing"), Q, lambda t: None)
        _edit_tensor(copy_model(ft, root / "shape"), Q, lambda t: t[:, :-1].contiguous())
        pk = root / "pickle"
        pk.mkdir()
        shutil.copy(ft / "config.json", pk)
        (pk / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    return {
        "hidden": ([str(other / "base")], "hidden_size=32"),
        "layers": ([str(root / "shallow" / "base")], "num_hidden_layers=3"),
        "missing": ([str(root / "missing")], Q),
        "shape": ([str(root / "shape")], Q),
        "pickle": ([str(root / "pickle")], "only pickle weights"),
        "none": ([], "at least one fine-tune"),
    }


@pytest.mark.parametrize("case", ["hidden", "layers", "missing", "shape", "pickle", "none"])
def test_bad_input_gives_one_clear_message_and_no_output(family, tmp_path, capsys, case):
    root, base, fts = family
    models, needle = _bad_cases(root, base, fts[0])[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["merge", "--base", str(base), *models, "--output", str(out)], capsys)
    assert code == 2
    assert needle in stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    assert "hint:" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_not_empty_is_refused_and_kept(family, tmp_path, capsys):
    _, base, fts = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, stderr = run_cli(["merge", "--base", str(base), str(fts[0]), "--output", str(out)], capsys)
    assert code == 2 and "is not empty" in stderr and "--overwrite" in stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_inside_input_is_refused(family, capsys):
    _, base, fts = family
    code, _, stderr = run_cli(["merge", "--base", str(base), str(fts[0]), "--output", str(base / "merged")], capsys)
    assert code == 2 and "inside the input model" in stderr
    assert not (base / "merged").exists()


def test_debug_shows_traceback(family, tmp_path):
    _, base, _ = family
    with pytest.raises(hf_metagpt.MergeError, match="at least one fine-tune"):
        cli_main(["--debug", "merge", "--base", str(base), "--output", str(tmp_path / "o")])


# ------------------------------------------------------------------ METHOD.md edge cases

def test_one_finetune_gives_the_finetune_with_a_warning(family, tmp_path, caplog):
    _, base, fts = family
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        r = hf_metagpt.merge(base=str(base), models=[str(fts[0])], output=str(tmp_path / "o"), progress=False)
    assert r.coefficients == {"model": [1.0]}
    assert "only one fine-tune" in caplog.text
    got, want = load_state(tmp_path / "o"), load_state(fts[0])
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_finetune_equal_to_base_gets_zero_lambda_and_warning(family, tmp_path, caplog):
    _, base, fts = family
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        r = hf_metagpt.merge(base=str(base), models=[str(fts[0]), str(base)], output=str(tmp_path / "o"),
                             granularity="layer", progress=False)
    assert all(c[1] == 0.0 and c[0] == 1.0 for c in r.coefficients.values())
    assert "equals the base everywhere" in caplog.text
    assert any("contributes nothing" in w for w in r.warnings)


def test_zero_group_gives_base_and_no_nan(family, tmp_path):
    _, base, _ = family
    r = hf_metagpt.merge(base=str(base), models=[str(base), str(base)], output=str(tmp_path / "o"),
                         granularity="tensor", progress=False)
    assert all(c == [0.0, 0.0] for c in r.coefficients.values())
    coeffs = json.loads((tmp_path / "o" / "metagpt_coefficients.json").read_text())
    assert all(g["lambdas"] == [0.0, 0.0] for g in coeffs["groups"].values())
    got, want = load_state(tmp_path / "o"), load_state(base)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_low_lambda_warning(family, tmp_path, caplog):
    root, base, fts = family
    tiny_ft = root / "tiny-task"
    if not tiny_ft.exists():
        # A fine-tune 100x closer to the base than the other: λ ≈ 1e-4.
        shutil.copytree(fts[0], tiny_ft)
        b = load_state(base)
        for name in b:
            _edit_tensor(tiny_ft, name, lambda t, n=name: (b[n].float() + (t.float() - b[n].float()) / 100).to(t.dtype))
    with caplog.at_level(logging.WARNING, logger="hf_metagpt"):
        r = hf_metagpt.merge(base=str(base), models=[str(fts[1]), str(tiny_ft)], output=str(tmp_path / "o"), progress=False)
    assert r.coefficients["model"][1] < 0.01
    assert "contributes almost nothing" in caplog.text and "--granularity layer" in caplog.text


def test_nonfinite_input_is_refused_with_model_and_tensor(family, tmp_path, capsys):
    root, base, fts = family
    bad = copy_model(fts[0], tmp_path / "nan-ft")
    _edit_tensor(bad, Q, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    out = tmp_path / "o"
    code, _, stderr = run_cli(["merge", "--base", str(base), str(bad), str(fts[1]), "--output", str(out)], capsys)
    assert code == 2 and "NaN or Inf" in stderr and Q in stderr and "nan-ft" in stderr
    assert not out.exists()
    r = hf_metagpt.merge(base=str(base), models=[str(bad), str(fts[1])], output=str(out),
                         allow_nonfinite=True, progress=False)
    got = load_state(out)[Q]
    assert bool(torch.isfinite(got.float()).all())
    # The NaN row counts as unchanged from the base: only the other fine-tune moves it.
    b, f1 = load_state(base)[Q].double(), load_state(fts[1])[Q].double()
    lam = r.coefficients["model"]
    assert_within_ulp(got[0], b[0] + lam[1] * (f1[0] - b[0]), torch.bfloat16,
                      scale=torch.maximum(b[0].abs(), f1[0].abs()))


# ------------------------------------------------------------------ vocabulary and tied embeddings

@pytest.mark.parametrize("source", ["base", "ft"])
def test_vocabulary_mismatch_merges_shared_rows(family, tmp_path, source, caplog):
    root, base, fts = family
    big = root / "added-tokens"
    if not big.exists():
        add_tokens(fts[1], big, 2)
    tok_src = "base" if source == "base" else str(big)
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO, logger="hf_metagpt"):
        r = hf_metagpt.merge(base=str(base), models=[str(fts[0]), str(big)], output=str(out),
                             tokenizer_source=tok_src, granularity="tensor", progress=False)
    b, f0, f1 = load_state(base), load_state(fts[0]), load_state(big)
    shared = {k: v[:128] if v.shape[0] == 130 else v for k, v in f1.items()}
    expected, lambdas = reference_metagpt(b, [f0, shared], "tensor")
    got = load_state(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = 128 if source == "base" else 130
        assert got[name].shape[0] == rows
        assert_within_ulp(got[name][:128], expected[name], torch.bfloat16)
        assert r.coefficients[name] == pytest.approx(lambdas[name], rel=1e-6)
        if source == "ft":
            assert torch.equal(got[name][128:], f1[name][128:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == (128 if source == "base" else 130)
    assert ("dropped" if source == "base" else "copied") in caplog.text


def test_tied_embeddings_merge_embed_only_and_keep_tie(tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = build_family(tmp_path / "tied", n_models=2, spec=TinySpec(tie_word_embeddings=True))
    assert "lm_head.weight" not in load_state(base)
    out = tmp_path / "o"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), progress=False)
    got = load_state(out)
    assert "lm_head.weight" not in got
    expected, _ = reference_metagpt(load_state(base), [load_state(f) for f in fts], "model")
    for name, e in expected.items():
        assert_within_ulp(got[name], e, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_config_that_does_not_match_the_weights_is_refused_and_nothing_stays(family, tmp_path, capsys):
    root, base, fts = family
    lying = [copy_model(p, tmp_path / "in" / p.name) for p in (base, *fts)]
    for folder in lying:  # every config agrees, but none matches the stored MLP shapes
        cfg = json.loads((folder / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, stderr = run_cli(["merge", "--base", str(lying[0]), *map(str, lying[1:]), "--output", str(out)], capsys)
    assert code == 2 and "its config implies" in stderr and "mlp" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
