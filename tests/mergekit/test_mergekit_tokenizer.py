"""mergekit's tokenizer sources: the output's vocabulary rows follow the tokenizer.

A fine-tune that added two tokens (ChatML's) within the padding rows of its embedding, as real ones
do: with `tokenizer_source: union` (or `tokenizer: {source: union}`) the output has 101 rows — the
99 shared tokens merged, the 2 added ones that model's own rows — and its tokenizer; with `base`,
99 rows (the padding rows past the tokenizer left out). mergekit 0.1.5 gave these very bytes on
this family when this was written; here the merged rows are checked against float64 task
arithmetic and the copied rows byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import assert_within_ulp, load_state

from hf_metagpt.demo.tiny import TinySpec, build_family, tiny_tokenizer

ADDED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base, (a, b) = build_family(root, n_models=2, spec=TinySpec(num_hidden_layers=2), seed=5)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (a / f).unlink(missing_ok=True)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.save_pretrained(a)
    return base, a, b


def merge(family, tmp_path, tokenizer: str):
    base, a, b = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5}}
        dtype: float32
        out_dtype: bfloat16
    """) + tokenizer)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "-o", str(out),
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout + proc.stderr


def expected_rows(family, rows: int) -> dict[str, torch.Tensor]:
    base, a, b = (load_state(m) for m in family)
    out = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        v0 = base[name][:rows].double()
        out[name] = v0 + 0.5 * (a[name][:rows].double() - v0) + 0.5 * (b[name][:rows].double() - v0)
    return out


@pytest.mark.parametrize("tokenizer", ["tokenizer_source: union\n", "tokenizer:\n  source: union\n  tokens: {}\n"])
def test_union_tokenizer_keeps_the_added_tokens_rows(family, tmp_path, tokenizer):
    out, said = merge(family, tmp_path, tokenizer)
    assert "vocabulary: 101 rows" in said and "rows 99..100 are" in said
    got, a = load_state(out), load_state(family[1])
    for name, e in expected_rows(family, 99).items():
        assert got[name].shape == (101, 64)
        assert_within_ulp(got[name][:99], e, torch.bfloat16, scale=load_state(family[0])[name][:99])
        assert torch.equal(got[name][99:], a[name][99:101])  # the added tokens: that model's own rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 101
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 101 and tok.convert_tokens_to_ids(ADDED) == [99, 100]


def test_base_tokenizer_source_leaves_out_the_padding_rows(family, tmp_path):
    out, said = merge(family, tmp_path, "tokenizer_source: base\n")
    assert "vocabulary: 99 rows" in said
    got = load_state(out)
    for name, e in expected_rows(family, 99).items():
        assert got[name].shape == (99, 64)  # the embeddings have 128 rows; the tokenizer 99 tokens
        assert_within_ulp(got[name], e, torch.bfloat16, scale=load_state(family[0])[name][:99])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 99


def test_vocabularies_that_need_renumbering_are_refused(family, tmp_path):
    base, a, b = family
    clash = tmp_path / "clash"
    import shutil

    shutil.copytree(b, clash)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (clash / f).unlink(missing_ok=True)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    tok.save_pretrained(clash)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {clash}\n"
                      "parameters: {weight: 0.5}\ntokenizer_source: union\n")
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "-o",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no model's vocabulary holds every other's" in proc.stderr and "Traceback" not in proc.stderr
