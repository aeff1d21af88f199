"""Evaluation (per-task loss, exact match, ALD) and `compare`, against direct computations."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from hf_metagpt.cli import main
from hf_metagpt.evaluation.compare import CompareSettings, append_to_card, compare, parse_compare_recipe
from hf_metagpt.errors import MergeError
from hf_metagpt.evaluation.evaluate import evaluate, load_task, parse_task
from hf_metagpt.demo.tiny import TinySpec, build_family

SPEC = TinySpec(num_hidden_layers=2)
TEXTS = ["hello world", "the cat sat on the mat", "ab", "12+7=19 and 3+4=7", "def f(x): return x*3"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, fts = build_family(root, names=["chat", "math"], spec=SPEC)
    return root, base, fts


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@torch.no_grad()
def _direct_loss(folder, pairs):
    """Plain loop, one record at a time: (context ids, scored ids) -> mean NLL of the scored ids, EM."""
    model, _ = _load(folder)
    total, count, hits = 0.0, 0, 0
    for ctx, target in pairs:
        ids = torch.tensor([ctx + target])
        logits = model(ids).logits[0].float()
        pred = logits[len(ctx) - 1:-1]  # the logits that predict each scored token
        nll = torch.nn.functional.cross_entropy(pred, torch.tensor(target), reduction="sum")
        total += float(nll)
        count += len(target)
        hits += int(torch.equal(pred.argmax(-1), torch.tensor(target)))
    return total / count, hits / len(pairs)


def test_text_loss_equals_a_direct_computation(family, tmp_path):
    _, _, (chat, _) = family
    data = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    table = evaluate([str(chat)], [f"plain={data}"], batch_size=2, device="cpu", progress=False)
    score = table.row(str(chat)).scores["plain"]
    _, tok = _load(chat)
    pairs = [(ids[:1], ids[1:]) for ids in (tok(t)["input_ids"] for t in TEXTS)]
    expected, _ = _direct_loss(chat, pairs)
    assert score.loss == pytest.approx(expected, rel=1e-5)
    assert score.tokens == sum(len(t) - 1 for t in TEXTS)  # char tokenizer, no BOS: n-1 predictions
    assert score.samples == 5 and score.exact_match is None
    # batching and padding do not change the number
    one = evaluate([str(chat)], [f"plain={data}"], batch_size=1, device="cpu", progress=False)
    assert one.loss(str(chat), "plain") == pytest.approx(score.loss, rel=1e-5)


def test_prompt_answer_loss_is_on_answer_tokens_only_with_greedy_exact_match(family, tmp_path):
    _, _, (chat, _) = family
    model, tok = _load(chat)
    # Answers the model gets right (its own greedy continuation) and answers it gets wrong.
    right = []
    for prompt in ["hello", "abc", "x=1", "zzz", "The", "q", "42", "def"]:
        ids = tok(prompt)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=3)[0, len(ids):]
        answer = tok.decode(out)
        if tok(answer, add_special_tokens=False)["input_ids"] == out.tolist() and answer.strip():
            right.append({"prompt": prompt, "answer": answer})
        if len(right) == 2:
            break
    assert len(right) == 2, "the tiny model should continue some prompts with printable characters"
    wrong = [{"prompt": r["prompt"], "answer": r["answer"][::-1] + "#"} for r in right]
    records = right + wrong
    data = _jsonl(tmp_path / "qa.jsonl", records)
    table = evaluate([str(chat)], [f"qa={data}"], batch_size=3, device="cpu", progress=False)
    score = table.row(str(chat)).scores["qa"]
    pairs = [(tok(r["prompt"])["input_ids"], tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in records]
    expected, em = _direct_loss(chat, pairs)
    assert score.loss == pytest.approx(expected, rel=1e-5)
    assert score.tokens == sum(len(r["answer"]) for r in records)
    assert em == 0.5 and score.exact_match == 0.5


def test_ald_is_the_mean_loss_gap_to_each_tasks_fine_tune(family, tmp_path):
    _, base, (chat, math_ft) = family
    t1 = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:3]])
    t2 = _jsonl(tmp_path / "b.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+5=", "answer": "7"}])
    table = evaluate({"base": str(base)}, [f"chat={t1}", f"math={t2}"], device="cpu", progress=False,
                     task_models={"chat": str(chat), "math": str(math_ft)})
    assert [r.label for r in table.rows] == ["base", str(chat), str(math_ft)]
    L = table.loss
    by_hand = ((L("base", "chat") - L(str(chat), "chat")) + (L("base", "math") - L(str(math_ft), "math"))) / 2
    assert table.ald("base") == pytest.approx(by_hand, abs=1e-12)
    assert table.ald(str(chat)) == pytest.approx((L(str(chat), "math") - L(str(math_ft), "math")) / 2, abs=1e-12)
    assert f"{by_hand:+.4f}" in table.to_markdown().splitlines()[2]


def test_eval_cli_prints_losses_and_ald(family, tmp_path, capsys):
    _, base, (chat, math_ft) = family
    t1 = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    assert main(["-q", "eval", str(chat), "--base", str(base), "--task", f"chat={t1}", "--ald",
                 "--task-model", f"chat={chat}", "--device", "cpu", "--max-samples", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | role | chat loss | ALD |"
    base_row = lines[2].split("|")
    chat_row = lines[3].split("|")
    assert base_row[1].strip() == "base" and chat_row[1].strip() == str(chat)
    assert float(chat_row[4]) == 0.0  # a fine-tune's gap to itself
    assert float(base_row[4]) == pytest.approx(float(base_row[3]) - float(chat_row[3]), abs=2e-4)


def test_hub_dataset_id_loads_through_the_endpoint(family, tmp_path, hub_user):
    from huggingface_hub import HfApi

    _, _, (chat, _) = family
    data = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    repo = f"{hub_user}/eval-texts"
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.upload_file(path_or_fileobj=str(data), path_in_repo="data/test.jsonl", repo_id=repo, repo_type="dataset")
    assert load_task(f"t={repo}:test").texts == TEXTS
    hub = evaluate([str(chat)], [f"t={repo}"], device="cpu", progress=False)
    local = evaluate([str(chat)], [f"t={data}"], device="cpu", progress=False)
    assert hub.loss(str(chat), "t") == local.loss(str(chat), "t")


@pytest.mark.parametrize("spec, message", [
    ("nodata", "no NAME= before the dataset"),
    ("=x.jsonl", "Bad task name ''"),
    ("a b=x.jsonl", "Bad task name 'a b'"),
    ("t=", "no dataset after t="),
    ("t=x.jsonl:a:b:c", "more than DATASET:split:field"),
    ("t=x.jsonl::a,b,c", "give one text column or PROMPT,ANSWER"),
])
def test_malformed_task_specs_are_refused_before_any_io(spec, message):
    with pytest.raises(MergeError, match=re.escape(message)):
        parse_task(spec)


def test_task_specs_that_do_not_fit_the_data_say_what_is_there(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}])
    (tmp_path / "d.xyz").write_text("x")
    cases = [
        (f"t={tmp_path / 'missing.jsonl'}", "does not exist"),
        (f"t={tmp_path / 'd.xyz'}", "unknown file type"),
        (f"t={data}:test", "has no split 'test'"),
        (f"t={data}", "no 'text' column and no 'prompt' + 'answer' columns (columns: question, reply)"),
        (f"t={data}::question,answer", "no column 'answer'"),
    ]
    for spec, message in cases:
        with pytest.raises(MergeError, match=re.escape(message)):
            load_task(spec)
    qa = load_task(f"t={data}::question,reply")
    assert qa.prompts == ["q"] and qa.answers == ["r"]


def test_eval_cli_bad_task_is_one_clear_error(capsys):
    assert main(["eval", "m", "--task", "nodata"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Bad task spec 'nodata'") and "hint: Use NAME=DATASET" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_compare_fills_a_row_per_method_and_appends_to_the_card(family, tmp_path, capsys):
    from huggingface_hub import ModelCard

    root, base, (chat, math_ft) = family
    _jsonl(tmp_path / "chat.jsonl", [{"text": t} for t in TEXTS])
    _jsonl(tmp_path / "math.jsonl", [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)])
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(f"""base: {base}
models: [{chat}, {math_ft}]
compare:
  methods: [metagpt, task_arithmetic, ties, dare_linear]
  parameters: {{ties: {{density: 0.5}}}}
  tasks: {{chat: {tmp_path / 'chat.jsonl'}, math: {tmp_path / 'math.jsonl'}}}
  batch_size: 4
""")
    kept = tmp_path / "kept"
    assert main(["-q", "compare", "--recipe", str(recipe), "--keep", str(kept), "--card", "metagpt",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert out.splitlines()[0] == "| model | role | chat loss | math loss | math EM | ALD |"
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["base", str(chat), str(math_ft), "metagpt", "task_arithmetic", "ties", "dare_linear"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")][2:]
        assert len(cells) == 4 and all(math.isfinite(float(c)) for c in cells), r
    assert "fine-tune (chat)" in rows[1] and "merge (paper)" in rows[3]
    assert (kept / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card_path = kept / "metagpt" / "README.md"
    card = ModelCard.load(card_path)
    assert "metagpt" in card.data.tags and "## Comparison with other merge methods" in card.text
    front = card_path.read_text().split("\n---\n", 1)[0]
    assert rows[3] in card.text and (kept / "metagpt" / "compare.png").is_file()
    # the front matter is untouched, and a second append replaces the section instead of adding one
    values, settings = parse_compare_recipe(recipe.read_text())
    settings.methods = ["linear"]
    again = compare(values, settings, device="cpu", progress=False, plot=tmp_path / "p.png")
    assert [r.label for r in again.table.rows][-1] == "linear" and again.outputs == {"linear": None}
    append_to_card(kept / "metagpt", again.table)
    card2 = ModelCard.load(card_path)
    assert card2.data.to_dict() == card.data.to_dict() and card_path.read_text().startswith(front + "\n---\n")
    assert card2.text.count("## Comparison with other merge methods") == 1 and "| linear | merge |" in card2.text


def test_compare_needs_tasks_and_a_fine_tune_per_task(family, tmp_path):
    _, base, (chat, math_ft) = family
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    values = {"base": str(base), "models": [str(chat), str(math_ft)]}
    with pytest.raises(MergeError, match="needs at least one task"):
        compare(values, CompareSettings())
    with pytest.raises(MergeError, match="No fine-tune given for task"):
        compare(values, CompareSettings(tasks=[parse_task(f"other={data}")]))
    with pytest.raises(MergeError, match="Unknown merge method"):
        compare(values, CompareSettings(methods=["nope"], tasks=[parse_task(f"chat={data}")]))
    with pytest.raises(MergeError, match=r"Unknown key\(s\) 'task'"):
        parse_compare_recipe(f"base: {base}\ncompare:\n  task: x\n")
