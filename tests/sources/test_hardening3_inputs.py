"""Damaged config.json and adapter_config.json fields: an InputError naming the file and the field,
never a traceback nor a message that blames the wrong model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.demo.tiny import TinySpec, build_family
from hf_metagpt.errors import InputError
from helpers import copy_model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("h3in")
    base, fts = build_family(root, n_models=1, spec=TinySpec(dtype=torch.float32))
    return root, base, fts


def _with_config(src: Path, dst: Path, edit) -> Path:
    copy_model(src, dst)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(config)))
    return dst


CONFIG_CASES = {
    "list": (lambda c: [c], "config.json holds a list, not a JSON object"),
    "architectures-number": (lambda c: {**c, "architectures": 5}, "field 'architectures' must be a list of class names"),
    "architectures-string": (lambda c: {**c, "architectures": "LlamaForCausalLM"},
                             "field 'architectures' must be a list of class names"),
    "hidden-size-text": (lambda c: {**c, "hidden_size": str(c["hidden_size"])},
                         "field 'hidden_size' must be a whole number, got '"),
    "layers-float": (lambda c: {**c, "num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be a whole number"),
    "tie-text": (lambda c: {**c, "tie_word_embeddings": "no"}, "field 'tie_word_embeddings' must be true or false"),
}


@pytest.mark.parametrize("which", ["base", "fine-tune"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_field_of_the_wrong_type_is_named_with_its_model(family, tmp_path, case, which):
    root, base, fts = family
    edit, needle = CONFIG_CASES[case]
    bad = _with_config(base if which == "base" else fts[0], tmp_path / f"bad-{case}", edit)
    models = [str(fts[0])] if which == "base" else [str(bad)]
    with pytest.raises(InputError) as err:
        hf_metagpt.plan(base=str(bad if which == "base" else base), models=models)
    assert err.value.message.startswith(f"{bad.name}: ") or bad.name in err.value.message
    assert needle in err.value.message and "config.json" in err.value.hint


def test_config_that_is_a_list_is_refused_by_the_cli(family, tmp_path):
    root, base, fts = family
    bad = _with_config(fts[0], tmp_path / "listcfg", lambda c: [c])
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "plan", "--base", str(base), str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "listcfg: config.json holds a list, not a JSON object" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ adapter_config.json

@pytest.fixture(scope="module")
def adapter(family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, base, _ = family
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = root / "adapter"
    model.save_pretrained(folder)
    return folder


ADAPTER_CASES = {
    "r-zero": ({"r": 0}, "gives r=0; a LoRA rank must be a positive whole number"),
    "r-zero-rslora": ({"r": 0, "use_rslora": True}, "gives r=0; a LoRA rank must be a positive whole number"),
    "alpha-text": ({"lora_alpha": "8"}, "gives lora_alpha='8'; lora_alpha must be a finite number"),
    "alpha-pattern-text": ({"alpha_pattern": {"v_proj": "12"}},
                           "gives alpha_pattern['v_proj']='12'; lora_alpha must be a finite number"),
    "rank-pattern-list": ({"rank_pattern": ["q_proj", 2]}, "gives rank_pattern as ['q_proj', 2]; it must map"),
    "alpha-huge": ({"lora_alpha": 1e38}, "lora_alpha 1e+38 with rank 4 scales the update by 2.5e+37"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_config_field_that_peft_would_choke_on_is_named(family, adapter, tmp_path, case):
    root, base, _ = family
    fields, needle = ADAPTER_CASES[case]
    bad = tmp_path / f"ad-{case}"
    shutil.copytree(adapter, bad)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    with pytest.raises(InputError) as err:
        hf_metagpt.plan(base=str(base), models=[str(bad)])
    assert f"{bad.name}: adapter_config.json" in err.value.message and needle in err.value.message
    assert "Fix adapter_config.json" in err.value.hint


@pytest.mark.slow
def test_adapter_with_zero_rank_is_refused_by_the_cli(family, adapter, tmp_path):
    root, base, _ = family
    bad = tmp_path / "ad-r0"
    shutil.copytree(adapter, bad)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", "--base", str(base), str(bad),
                           "--output", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "gives r=0" in proc.stderr and "Traceback" not in proc.stderr and "ZeroDivision" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_valid_adapter_still_plans(family, adapter):
    root, base, _ = family
    the_plan = hf_metagpt.plan(base=str(base), models=[str(adapter)])
    assert len(the_plan.models) == 1
