"""The paper's recipe (recipes/llama2-7b-paper.yaml) rehearsed end to end against tiny replicas on the local Hub.

One repo per model ID of the recipe, each laid out the way such repos really are:

* base (`meta-llama/Llama-2-7b-hf`): float16, both `pytorch_model-*.bin` and safetensors shards, a
  README with `license: llama2`, gated like the real repo (the test user was granted access);
* general (`meta-llama/Llama-2-7b-chat-hf`): only pickle shards (`pytorch_model-*.bin` + index),
  gated too;
* math (`TIGER-Lab/MAmmoTH-7B`): float32 weights, MIT licence;
* code (`mrm8488/llama-2-coder-7b`): an added pad token (one more vocabulary row, tokenizer files
  that say so) and trainer leftovers beside the weights.

The recipe is run by ID as shipped (it sets `allow_pickle`), pushed, downloaded back, loaded with transformers,
and checked against an independent MetaGPT and on its card.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError
from safetensors.torch import load_file, save_file

from hf_metagpt.demo.tiny import TinySpec, build_family, tiny_tokenizer
from helpers import run_cli
from reference import assert_within_ulp, load_state, reference_metagpt
from test_pickle_inputs import pickle_copy

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama2-7b-paper.yaml"
VOCAB = 99  # the tiny tokenizer's size: like LLaMA-2's 32000, the embedding has exactly one row per token


def _to_float32(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(p).items()}, p, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["metadata"]["total_size"] = data["metadata"]["total_size"] * 2
        index.write_text(json.dumps(data))
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config))


def _add_pad_token(folder: Path) -> None:
    """One more token, `[PAD]` (as many LLaMA-2 fine-tunes did): 100 rows, and a tokenizer that knows it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    tok = tiny_tokenizer(extra_tokens=["[PAD]"])
    tok.pad_token = "[PAD]"
    assert len(tok) == VOCAB + 1
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB:] = torch.randn(1, model.config.hidden_size).half()
        model.get_output_embeddings().weight[VOCAB:] = torch.randn(1, model.config.hidden_size).half()
    model.config.pad_token_id = tok.pad_token_id
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    model.save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)


def _trainer_leftovers(folder: Path) -> None:
    torch.save({"learning_rate": 2e-5}, folder / "training_args.bin")
    torch.save({"state": os.urandom(1024)}, folder / "optimizer.pt")
    (folder / "checkpoint-50").mkdir()
    shutil.copy(folder / "config.json", folder / "checkpoint-50" / "config.json")
    save_file({"w": torch.zeros(4)}, folder / "checkpoint-50" / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 50}))


def _readme(folder: Path, license_: str, title: str) -> None:
    (folder / "README.md").write_text(f"---\nlicense: {license_}\n---\n# {title} (tiny replica)\n")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, local_hub, hub_user, hub_new_user):
    recipe = yaml.safe_load(RECIPE.read_text())
    ids = [recipe["base"], *recipe["models"]]
    root = tmp_path_factory.mktemp("paper")
    base, (chat, math, code) = build_family(
        root / "st", names=["chat", "math", "code"], spec=TinySpec(vocab_size=VOCAB, dtype=torch.float16))
    _to_float32(math)
    _add_pad_token(code)
    originals = [base, chat, math, code]  # safetensors, for the reference

    pub = root / "pub"
    shutil.copytree(base, pub / "base")
    bins = pickle_copy(base, root / "base-bins")
    for p in bins.glob("pytorch_model*"):
        shutil.copy(p, pub / "base" / p.name)  # both layouts, as meta-llama's repos have
    _readme(pub / "base", "llama2", ids[0])
    pickle_copy(chat, pub / "chat")
    _readme(pub / "chat", "llama2", ids[1])
    shutil.copytree(math, pub / "math")
    _readme(pub / "math", "mit", ids[2])
    shutil.copytree(code, pub / "code")
    _trainer_leftovers(pub / "code")
    _readme(pub / "code", "llama2", ids[3])

    # meta-llama's repos belong to an account of theirs, not to the test user: their gate applies to
    # the test user, who was granted access (as if the licence had been accepted and approved).
    publisher_token, publisher = hub_new_user("llama-publisher")
    for repo, name in zip(ids, ["base", "chat", "math", "code"]):
        ns = repo.split("/")[0]
        member, token = (publisher, publisher_token) if ns == "meta-llama" else (hub_user, None)
        local_hub.add_org(ns, [member])
        api = HfApi(token=token)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=pub / name, commit_message=f"tiny replica of {repo}",
                          delete_patterns=["*"])
        if ns == "meta-llama":
            local_hub.set_gated(repo, "manual")
            local_hub.grant_access(repo, hub_user)
    return ids, originals


def test_the_meta_llama_replicas_are_gated(replicas, hub_other_token):
    ids, _ = replicas
    for repo in ids[:2]:
        assert HfApi(token=hub_other_token).model_info(repo).gated == "manual"
        with pytest.raises(GatedRepoError):  # an account without access gets none of their files
            hf_hub_download(repo, "config.json", token=hub_other_token)
    assert HfApi(token=hub_other_token).model_info(ids[2]).gated is False


def test_the_papers_recipe_runs_by_id_pushes_and_loads(replicas, tmp_path, capsys, hub_user, local_hub):
    ids, originals = replicas
    out = tmp_path / "merged"
    # Without the recipe's `allow_pickle: true` the pickle-only fine-tune is refused, naming the flag.
    strict = tmp_path / "strict.yaml"
    strict.write_text(RECIPE.read_text().replace("allow_pickle: true", ""))
    code, _, err = run_cli(["merge", "--recipe", str(strict), "--device", "cpu", "-o", str(out)], capsys)
    assert code == 2 and f"{ids[1]}: only pickle weights on the Hub" in err and "--allow-pickle" in err

    # The recipe as shipped runs as it is: no flag to add.
    args = ["merge", "--recipe", str(RECIPE), "--device", "cpu", "-o", str(out)]
    pushed = f"{hub_user}/llama2-7b-metagpt-rehearsal"
    local_hub.clear_requests()
    code, stdout, err = run_cli([*args, "--push-to", pushed], capsys)
    assert code == 0, err
    # The base's pickle twin and the code fine-tune's trainer leftovers were never fetched.
    # (over Xet a file's transfer is a HEAD answered 302 with its Xet hash, then hf_xet's, by hash)
    fetched = {r.path for r in local_hub.requests if "/resolve/" in r.path and (r.status or 200) < 400
               and (r.method == "GET" or (r.method == "HEAD" and r.status == 302))}
    assert not [p for p in fetched if p.startswith(f"/{ids[0]}/") and p.endswith(".bin")]
    assert not [p for p in fetched if "checkpoint-50" in p or "optimizer" in p or "training_args" in p]
    assert [p for p in fetched if p.startswith(f"/{ids[1]}/") and p.endswith(".bin")]  # chat: converted

    back = Path(snapshot_download(pushed))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(back, dtype="auto")
    assert model.dtype == torch.float16 and model.config.vocab_size == VOCAB
    assert len(AutoTokenizer.from_pretrained(back)) == VOCAB  # the base's tokenizer (the recipe's default)

    # The merged weights against an independent MetaGPT (one λ per fine-tune, the paper's setting),
    # on the rows every model has; the code model's [PAD] row is not in the output.
    base, *fts = (load_state(f) for f in originals)
    fts = [{k: v[:VOCAB] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else v for k, v in ft.items()}
           for ft in fts]
    expected, lambdas = reference_metagpt(base, fts, "model")
    got = load_state(back)
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        assert_within_ulp(got[name], e, torch.float16)
    coeffs = json.loads((back / "metagpt_coefficients.json").read_text())
    assert list(coeffs["groups"]) == ["model"]
    assert coeffs["groups"]["model"]["lambdas"] == pytest.approx(lambdas["model"], rel=1e-9)

    card = ModelCard.load(back / "README.md")
    assert card.data.base_model == ids and card.data.base_model_relation == "merge"
    api = HfApi()
    for repo in ids:
        sha = api.model_info(repo).sha
        assert f"`{sha}`" in card.text and f"{repo}@{sha}" in card.text  # inputs table and pinned recipe
    assert f"rows {VOCAB}..{VOCAB} of {ids[3]} dropped" in card.text
    assert card.data.license == "other" and "llama2, mit" in card.text
