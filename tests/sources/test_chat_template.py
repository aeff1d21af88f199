"""The output's chat template ([users] 4, mergekit's `chat_template:`): carried from the fine-tunes
when the base has none (said), a warning when they disagree, and auto / chatml / a model / a
template string as asked. Each output's tokenizer is loaded with transformers and applies it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import run_cli

from hf_metagpt.demo.tiny import TinySpec, build_family

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi"}]


def set_template(folder, template, where="config"):
    if where == "jinja":
        (folder / "chat_template.jinja").write_text(template)
        return
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["chat_template"] = template
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base, fts = build_family(root, n_models=3, spec=TinySpec(num_hidden_layers=2), seed=2)
    set_template(fts[0], CHAT)                 # in tokenizer_config.json
    set_template(fts[1], CHAT, where="jinja")  # in chat_template.jinja (transformers' newer place)
    set_template(fts[2], OTHER)
    return base, fts


def rendered(out) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False)


def bos_token(out) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).bos_token or ""


def test_a_base_without_template_gets_the_fine_tunes_one_and_says_which(family, tmp_path):
    base, (a, b, c) = family
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--base", str(base), str(a), str(b), str(c),
                           "-o", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "has no chat template: the output takes" in said and f"{a.name}'s" in said
    # two of the three agree: theirs is taken, and the disagreement is a warning naming the other
    assert "chat templates differ" in said and "2 of 3 have it" in said and c.name in said
    assert rendered(out) == "<|user|>hi"
    assert (out / "chat_template.jinja").read_text() == CHAT
    assert "has no chat template: the output takes" in (out / "README.md").read_text()  # the card says it too


def test_fine_tunes_that_agree_give_no_warning(family, tmp_path, capsys):
    base, (a, b, _) = family
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--base", str(base), str(a), str(b), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "differ" not in err
    assert rendered(out) == "<|user|>hi"


def test_the_tokenizer_sources_own_template_is_kept(family, tmp_path, capsys):
    _, (a, b, c) = family
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--base", str(c), str(a), str(b), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "chat template" not in err
    assert rendered(out) == "[user] hi"


@pytest.mark.parametrize("value, expected", [
    ("auto", "<|user|>hi"),                    # the most common among base and models
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
    # mergekit 0.1.5's other built-in names, our own text of each format (a published breadcrumbs recipe asks alpaca)
    ("alpaca", "### Instruction:\nhi\n\n"),
    ("mistral", "BOS[INST] hi [/INST]"),
    ("exaone", "[|user|]hi\n"),
    ("'{{ messages[0][\"content\"] }}!'", "hi!"),
    ("MODEL_C", "[user] hi"),                  # one of the models (mergekit refuses a model name)
])
def test_mergekit_chat_template_key(family, tmp_path, capsys, value, expected):
    base, (a, b, c) = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.3}}
          - model: {c}
            parameters: {{weight: 0.3}}
        chat_template: {value.replace("MODEL_C", str(c))}
    """))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--recipe", str(recipe), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert rendered(out) == expected.replace("BOS", bos_token(out))


def test_a_chat_template_that_means_nothing_is_refused_with_mergekits_reason(family, tmp_path, capsys):
    base, (a, _, _) = family
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--base", str(base), str(a), "-o", str(out), "--device", "cpu",
                            "--chat-template", "no-such-thing"], capsys)
    assert code != 0
    assert "Invalid chat template 'no-such-thing'" in err and "mergekit refuses it too" in err
    assert not out.exists()
