"""mergekit's `model+adapter` references, for any model and for the base: the adapter is applied
to that model before the merge. The reference is peft itself (what mergekit 0.1.5 uses: the
output of `linear` over `ft+lora` was mergekit's bytes when this was written): the model with the
adapter merged by `merge_and_unload`, saved, and merged as an ordinary folder — the bytes must be
the same."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import shards
from reference import load_state

from hf_metagpt.demo.tiny import TinySpec, build_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorarefs")
    base, (a, b) = build_family(root, n_models=2, spec=TinySpec(num_hidden_layers=2), seed=6)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, t in peft_model.named_parameters():
            if "lora_" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
    lora = root / "lora"
    peft_model.save_pretrained(lora)
    # the reference: peft applies the adapter to model b (and to the base), saved as plain models
    refs = {}
    for name, folder in (("b", b), ("base", base)):
        from peft import PeftModel

        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(m, lora).merge_and_unload()
        refs[name] = root / f"{name}-with-lora"
        merged.save_pretrained(refs[name])
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (folder / f).exists():
                (refs[name] / f).write_bytes((folder / f).read_bytes())
    return base, a, b, lora, refs


def run(recipe, out, env_home):
    import os

    env = dict(os.environ, HF_HOME=str(env_home))
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--recipe", str(recipe), "-o", str(out),
                           "--device", "cpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def reference(recipe, out):
    """The plain recipe (peft's merged models as ordinary folders), merged in this process: the CLI
    runs above are what is tested, this is only what they must equal."""
    import hf_metagpt

    hf_metagpt.merge(recipe=str(recipe), output=str(out), device="cpu", progress=False)


@pytest.mark.slow
def test_an_adapter_on_a_model_other_than_the_base(family, tmp_path):
    base, a, b, lora, refs = family
    body = """\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6}}
          - model: {b}
            parameters: {{weight: 0.4}}
        dtype: bfloat16
    """
    recipe, plain = tmp_path / "r.yml", tmp_path / "plain.yml"
    recipe.write_text(textwrap.dedent(body.format(base=base, a=a, b=f"{b}+{lora}")))
    plain.write_text(textwrap.dedent(body.format(base=base, a=a, b=refs["b"])))
    said = run(recipe, tmp_path / "out", tmp_path / "home")
    reference(plain, tmp_path / "ref")
    got, want = load_state(tmp_path / "out"), load_state(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # the adapter changed what it targets
    assert not torch.equal(load_state(refs["b"])["model.layers.0.self_attn.q_proj.weight"],
                           load_state(b)["model.layers.0.self_attn.q_proj.weight"])
    assert "Traceback" not in said
    # applied once: a rerun reuses the folder and gives the same shards
    run(recipe, tmp_path / "again", tmp_path / "home")
    assert shards(tmp_path / "again") == shards(tmp_path / "out")


@pytest.mark.slow
def test_an_adapter_on_the_base_model(family, tmp_path):
    base, a, b, lora, refs = family
    body = """\
        merge_method: ties
        base_model: {base}
        models:
          - model: {base}
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.5}}
        dtype: bfloat16
    """
    recipe, plain = tmp_path / "r.yml", tmp_path / "plain.yml"
    recipe.write_text(textwrap.dedent(body.format(base=f"{base}+{lora}", a=a, b=b)))
    plain.write_text(textwrap.dedent(body.format(base=refs["base"], a=a, b=b)))
    run(recipe, tmp_path / "out", tmp_path / "home")
    reference(plain, tmp_path / "ref")
    got, want = load_state(tmp_path / "out"), load_state(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
