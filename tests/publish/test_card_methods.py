"""Each method's card says what that method did: its formula, its parameters as YAML, the models' roles,
tags by method, and MetaGPT's λ and geometry only for the MetaGPT methods. Merges run through the CLI
in a fresh interpreter, as a user runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard


ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family(n_models=2)


def _merge(family, out: Path, method: str, *extra: str, models: int = 2) -> tuple[ModelCard, str]:
    base, fts = family
    proc = cli("merge", "--base", str(base), *map(str, fts[:models]), "-o", str(out), "--method", method, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ModelCard.load(out / "README.md"), proc.stderr


def _yaml_blocks(text: str) -> list:
    return [yaml.safe_load(b.split("```", 1)[0]) for b in text.split("```yaml\n")[1:]]


def _metagpt_free(card: ModelCard, out: Path) -> None:
    text = card.text
    assert "metagpt" not in (card.data.tags or [])
    for phrase in ("Granularity", "paper's method", "MetaGPT λ", "## Coefficients (λ)", "1.0000",
                   "Task-vector geometry", "lambda_", "{'"):
        assert phrase not in text, phrase
    assert not (out / "metagpt_lambdas.png").exists()


def test_ties_card_describes_ties_not_metagpt(family, tmp_path):
    out = tmp_path / "ties"
    card, _ = _merge(family, out, "ties", "--param", "density=0.4")
    _metagpt_free(card, out)
    assert card.data.tags == ["merge", "ties", "hf-metagpt"]
    text = card.text
    assert "TIES" in text and "Yadav et al." in text and "sign" in text
    params = _yaml_blocks(text)[0]
    assert params["density"] == 0.4 and params["lambda"] == 1.0 and "lambda_" not in params
    method = text.split("## Method", 1)[1].split("\n## ", 1)[0]
    assert method.count("density: 0.4") == 1  # the parameters once, as YAML (the recipes aside)
    assert "A TIES merge of 2 fine-tunes of `base`" in text


def test_slerp_card_names_its_two_endpoints_and_no_false_warning(family, tmp_path):
    out = tmp_path / "slerp"
    card, err = _merge(family, out, "slerp", "--param", "t=0.3", models=1)
    assert "only one fine-tune" not in err and "every λ is 1" not in err
    _metagpt_free(card, out)
    text = card.text
    assert "fine-tune(s)" not in text and "only one fine-tune" not in text
    assert "| endpoint t = 0 (base) | `base` (local folder) | — |" in text
    assert f"| endpoint t = 1 | `{family[1][0].name}` (local folder) | — |" in text
    assert "spherical interpolation" in text.lower() and _yaml_blocks(text)[0] == {"t": 0.3}
    assert card.data.tags == ["merge", "slerp", "hf-metagpt"]


def test_model_stock_card_names_the_base_as_its_anchor(family, tmp_path):
    out = tmp_path / "ms"
    card, _ = _merge(family, out, "model_stock")
    _metagpt_free(card, out)
    assert "| anchor (base) | `base` (local folder) | — |" in card.text
    assert "Jang et al." in card.text and card.data.tags == ["merge", "model_stock", "hf-metagpt"]


@pytest.mark.parametrize("method, formula", [("linear", "Σ_t w_t θ_t"), ("task_arithmetic", "θ₀ + λ"),
                                             ("dare_ties", "DARE")])
def test_linear_family_cards_give_their_formula(family, tmp_path, method, formula):
    out = tmp_path / method
    card, _ = _merge(family, out, method)
    _metagpt_free(card, out)
    assert formula in card.text and method in card.data.tags


def test_metagpt_card_keeps_its_lambdas_geometry_and_paper(family, tmp_path):
    out = tmp_path / "mg"
    card, _ = _merge(family, out, "metagpt")
    text = card.text
    assert card.data.tags == ["merge", "metagpt", "hf-metagpt"]
    assert "## Coefficients (λ)" in text and "the paper's method" in text and "arXiv:2406.11385" in text
    assert (out / "metagpt_lambdas.png").is_file() and "Task-vector geometry" in text
    assert "{'" not in text


def test_every_card_has_an_evaluation_and_limitations_section(family, tmp_path):
    card, _ = _merge(family, tmp_path / "ta", "task_arithmetic")
    assert "## Evaluation and limitations" in card.text
    assert "not evaluated" in card.text


def test_granularity_is_refused_for_methods_it_does_not_apply_to(family, tmp_path):
    base, fts = family
    proc = cli("merge", "--base", str(base), *map(str, fts), "-o", str(tmp_path / "o"), "--method", "ties",
               "--granularity", "layer")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--granularity applies to the MetaGPT methods" in proc.stderr and "ties" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_custom_licence_gets_a_name_a_link_and_each_inputs_licence(tmp_path):
    from hf_metagpt.publish.card import build_card
    from hf_metagpt.result import MergeResult
    from hf_metagpt.engine.stats import StreamStats
    from hf_metagpt.sources.refs import ModelRef

    refs = [ModelRef(spec=f"org/{n}", repo_id=f"org/{n}", sha=c * 40) for n, c in (("base", "a"), ("chat", "b"),
                                                                                    ("math", "c"))]
    result = MergeResult(output=tmp_path / "m", base=refs[0], models=refs[1:], method="ties", parameters={"density": 0.5},
                         granularity="model", seed=None, coefficients={"model": [1.0, 1.0]}, sq_norms={},
                         stats=StreamStats(), out_dtype="BF16")
    card = build_card(result, licenses=["llama2", "mit", None])
    assert card.data.license == "other"
    assert card.data.license_name == "llama2-and-mit" and card.data.license_link == "README.md#licence"
    assert "| `org/base` | llama2 |" in card.text and "| `org/math` | unknown |" in card.text
    same = build_card(result, licenses=["apache-2.0"] * 3)
    assert same.data.license == "apache-2.0" and same.data.license_name is None


@pytest.mark.slow
def test_remote_code_files_the_config_names_are_kept_or_the_merge_is_refused(family, tmp_path):
    import json
    import shutil

    base, fts = family
    custom = tmp_path / "custom-base"
    shutil.copytree(base, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": ["modeling_tiny.TinyForCausalLM", None],
                          "AutoTokenizer": "other-org/tok--tokenization_x.X"}  # another repo's: not ours to copy
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_tiny.py").write_text("# the base's configuration code\n")
    proc = cli("merge", "--base", str(custom), *map(str, fts), "-o", str(tmp_path / "refused"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "modeling_tiny.py" in proc.stderr and "auto_map" in proc.stderr and "trust_remote_code" in proc.stderr
    assert not (tmp_path / "refused").exists()

    (custom / "modeling_tiny.py").write_text("# the base's modeling code\n")
    out = tmp_path / "kept"
    proc = cli("merge", "--base", str(custom), *map(str, fts), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("configuration_tiny.py", "modeling_tiny.py"):
        assert (out / name).read_bytes() == (custom / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    assert not (out / "tokenization_x.py").exists()


def test_remote_code_of_a_hub_base_is_downloaded_and_kept(family, tmp_path, hub_user):
    import json
    import shutil

    from huggingface_hub import HfApi

    base, fts = family
    custom = tmp_path / "custom-base"
    shutil.copytree(base, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_tiny.py").write_text("# the base's modeling code, from the Hub\n")
    repo = f"{hub_user}/remote-code-base"
    HfApi().create_repo(repo, exist_ok=True)
    HfApi().upload_folder(repo_id=repo, folder_path=custom)
    out = tmp_path / "out"
    proc = cli("merge", "--base", repo, *map(str, fts), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "modeling_tiny.py").read_text() == "# the base's modeling code, from the Hub\n"


QWEN_CARD = ("---\nlicense: other\nlicense_name: qwen-research\nlicense_link: {link}\n---\n# a model\n")


def test_a_custom_licence_of_the_inputs_carries_into_the_output_card(tmp_path):
    """Every input under `license: other` with the same `license_name`: the merge's card names it and links it."""
    import os
    import subprocess
    import sys

    from huggingface_hub import ModelCard

    from hf_metagpt.demo.tiny import build_family

    base, fts = build_family(tmp_path / "fam", n_models=2)
    link = "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE"
    for folder in (base, *fts):
        (folder / "README.md").write_text(QWEN_CARD.format(link=link))
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", *map(str, fts), "--base", str(base),
                           "-o", str(out), "--method", "ties", "--param", "density=0.5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = ModelCard.load(out / "README.md").data
    assert (data.license, data.license_name, data.license_link) == ("other", "qwen-research", link)
    assert "| other (qwen-research) |" in (out / "README.md").read_text()
    # one input under another custom licence: both names, and the card's own licence section as the link
    (fts[1] / "README.md").write_text(QWEN_CARD.format(link=link).replace("qwen-research", "tongyi-qianwen"))
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", "merge", *map(str, fts), "--base", str(base),
                           "-o", str(out), "--overwrite", "--method", "ties", "--param", "density=0.5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = ModelCard.load(out / "README.md").data
    assert (data.license, data.license_name, data.license_link) == ("other", "qwen-research-and-tongyi-qianwen",
                                                                    "README.md#licence")


def test_a_relative_licence_link_of_a_hub_input_points_into_that_repo(tmp_path):
    from types import SimpleNamespace

    from huggingface_hub import constants

    from hf_metagpt.sources.hub import License, _card_license

    card = tmp_path / "README.md"
    card.write_text(QWEN_CARD.format(link="LICENSE"))
    ref = SimpleNamespace(repo_id="Qwen/Qwen2.5-3B", sha="a" * 40)
    assert _card_license(card, ref) == License(
        "qwen-research", f"{constants.ENDPOINT.rstrip('/')}/Qwen/Qwen2.5-3B/blob/{'a' * 40}/LICENSE")
    assert _card_license(card) == License("qwen-research", None)  # a local folder's file: no link to give
    card.write_text("---\nlicense: apache-2.0\n---\n")
    assert _card_license(card) == "apache-2.0"
