"""Merging by Hub ID against the local Hub: pinned resolve, header-only plan, downloads, push, card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt.errors import IncompatibleModelsError
from hf_metagpt.errors import HubAccessError
from hf_metagpt.demo.tiny import build_family

NAMES = ["base", "chat", "math", "code"]


def _upload_family(api: HfApi, user: str, prefix: str, folders: list[Path], license_: str = "apache-2.0") -> list[str]:
    ids = []
    for name, folder in zip(NAMES, folders):
        repo = f"{user}/{prefix}-{name}"
        api.create_repo(repo, exist_ok=True)
        (folder / "README.md").write_text(f"---\nlicense: {license_}\n---\n# {name}\n")
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"tiny {name}")
        ids.append(repo)
    return ids


def _cached_shards(repo_id: str) -> list[Path]:
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return [p for p in folder.rglob("*.safetensors")] if folder.exists() else []


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _full_shard_gets(requests, ids=None) -> list:
    """GETs of whole weight files (header reads carry a Range)."""
    return [r for r in requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(".safetensors")
            and not r.range and (ids is None or any(f"/{i}/" in r.path for i in ids))]


@pytest.fixture(scope="module")
def family(tmp_path_factory, hub_user):
    root = tmp_path_factory.mktemp("hubfam")
    base, fts = build_family(root, n_models=3)
    folders = [base, *fts]
    ids = _upload_family(HfApi(), hub_user, "fam", folders)
    return folders, ids


@pytest.fixture(scope="module")
def local_merge(family, tmp_path_factory):
    folders, _ = family
    out = tmp_path_factory.mktemp("localmerge") / "out"
    hf_metagpt.merge(base=str(folders[0]), models=[str(f) for f in folders[1:]], output=str(out),
                     device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def hub_merge(family, tmp_path_factory, hub_user, local_hub):
    _, ids = family
    out = tmp_path_factory.mktemp("hubmerge") / "out"
    local_hub.clear_requests()
    result = hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False,
                              push_to=f"{hub_user}/fam-metagpt")
    return result, out, local_hub.requests


def test_plan_reads_headers_only(family, local_hub):
    _, ids = family
    local_hub.clear_requests()
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    assert plan.base.ref.sha and len(plan.base.ref.sha) == 40
    assert plan.bytes_to_read > 0 and len(plan.groups) > 4
    for i in ids:
        assert _cached_shards(i) == [], f"plan downloaded a shard of {i}"
    assert _full_shard_gets(local_hub.requests) == []
    ranged = [r for r in local_hub.requests if r.range and r.path.endswith(".safetensors")]
    assert ranged, "headers should come from Range reads"
    assert f"{ids[0]}@{plan.base.ref.sha}" in plan.describe()
    assert "download 0.00" in plan.describe() and "GB free" in plan.describe()


def test_merge_by_id_pushes_a_model_that_loads_and_equals_the_local_merge(hub_merge, local_merge, hub_user, tmp_path):
    result, out, _ = hub_merge
    assert result.pushed_url and result.pushed_url.endswith(f"{hub_user}/fam-metagpt")
    assert _shard_bytes(out) == _shard_bytes(local_merge)
    pulled = Path(snapshot_download(f"{hub_user}/fam-metagpt", local_dir=tmp_path / "pulled"))
    assert {"README.md", "metagpt_lambdas.png", "metagpt_coefficients.json", "hf_metagpt_recipe.yaml",
            "config.json", "tokenizer.json", "model.safetensors.index.json"} <= {p.name for p in pulled.iterdir()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pulled, dtype=torch.bfloat16)
    AutoTokenizer.from_pretrained(pulled)
    expected = {}
    for f in local_merge.glob("*.safetensors"):
        expected.update(load_file(f))
    state = model.state_dict()
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
    # Pushed as one commit: the repo has exactly two (creation + the upload).
    assert len(HfApi().list_repo_commits(f"{hub_user}/fam-metagpt")) == 2


def test_card_metadata_field_by_field(hub_merge, family, hub_user):
    result, _, _ = hub_merge
    _, ids = family
    card = ModelCard.load(f"{hub_user}/fam-metagpt")
    d = card.data
    assert d.base_model == ids
    assert d.base_model_relation == "merge"
    assert d.tags == ["merge", "metagpt", "hf-metagpt"]
    assert d.library_name == "transformers"
    assert d.pipeline_tag == "text-generation"
    assert d.license == "apache-2.0"
    for ref in [result.base, *result.models]:
        assert ref.sha and ref.sha in card.text and ref.repo_id in card.text
    assert "metagpt_lambdas.png" in card.text and "the paper's method" in card.text
    recipe_text = card.text.split("## Reproduce it", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = yaml.safe_load(recipe_text)
    assert recipe["base"] == f"{ids[0]}@{result.base.sha}"
    assert recipe["models"] == [f"{m.repo_id}@{m.sha}" for m in result.models]
    assert recipe_text == result.recipe
    # The λ table shows the model-granularity coefficient of every fine-tune.
    for lam in result.coefficients["model"]:
        assert f"{lam:.4f}" in card.text


def test_card_says_other_when_licenses_differ(family, tmp_path, hub_user):
    folders, ids = family
    api = HfApi()
    repo = f"{hub_user}/lic-mit"
    api.create_repo(repo, exist_ok=True)
    (tmp_path / "ft").mkdir()
    for p in folders[1].iterdir():
        (tmp_path / "ft" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "ft" / "README.md").write_text("---\nlicense: mit\n---\n")
    api.upload_folder(repo_id=repo, folder_path=tmp_path / "ft")
    hf_metagpt.merge(base=ids[0], models=[repo, ids[2]], output=str(tmp_path / "out"), device="cpu", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "other"
    assert "apache-2.0, mit" in card.text


def test_second_merge_of_the_same_inputs_downloads_nothing(hub_merge, family, local_hub, tmp_path):
    _, ids = family
    local_hub.clear_requests()
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(tmp_path / "again"), device="cpu", progress=False)
    file_reads = [r for r in local_hub.requests if "/resolve/" in r.path]
    assert file_reads == [], [r.path for r in file_reads]
    # Only the resolution of each ID to its commit went to the Hub.
    assert all(r.path.startswith("/api/models/") for r in local_hub.requests)


def test_commit_after_resolve_does_not_change_the_merge(family, local_merge, tmp_path, hub_user, monkeypatch, local_hub):
    folders, ids = family
    api = HfApi()
    repo = f"{hub_user}/pin-chat"
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folders[1])
    old_sha = api.model_info(repo).sha

    import hf_metagpt.engine.fetch as hub

    real_download = hub.download

    def commit_then_download(plan, *args, **kwargs):
        # Someone pushes different weights between our resolve and our download.
        api.upload_folder(repo_id=repo, folder_path=folders[2], commit_message="new weights")
        return real_download(plan, *args, **kwargs)

    monkeypatch.setattr(hub, "download", commit_then_download)
    local_hub.clear_requests()
    result = hf_metagpt.merge(base=ids[0], models=[repo, ids[2], ids[3]], output=str(tmp_path / "out"),
                              device="cpu", progress=False)
    assert api.model_info(repo).sha != old_sha
    assert result.models[0].sha == old_sha
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(local_merge)
    reads = [r.path for r in local_hub.requests if "/resolve/" in r.path and f"/{repo}/" in r.path]
    assert reads and all(f"/resolve/{old_sha}/" in p for p in reads)


@pytest.mark.usefixtures("http_only")  # counts each shard's resolve GET per pass (over Xet: reconstructions by hash)
def test_low_disk_gives_byte_identical_shards_and_keeps_no_shard(family, local_merge, tmp_path, hub_user, local_hub,
                                                                  monkeypatch):
    import hf_metagpt.engine.fetch as hub

    folders, _ = family
    ids = _upload_family(HfApi(), hub_user, "ld", folders)
    on_disk: list[int] = []
    real_path = hub.LowDiskFiles.path

    def counting_path(self, *args):
        got = real_path(self, *args)
        on_disk.append(len(list(self.scratch.rglob("*.safetensors"))))
        return got

    monkeypatch.setattr(hub.LowDiskFiles, "path", counting_path)
    local_hub.clear_requests()
    out = tmp_path / "out"
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False, low_disk=True)
    assert _shard_bytes(out) == _shard_bytes(local_merge)
    for i in ids:
        assert _cached_shards(i) == [], "low-disk must not keep shards in the cache"
    assert not any(p.name.endswith("hf-metagpt-download") for p in tmp_path.iterdir())
    n_shards = sum(len(list(f.glob("*.safetensors"))) for f in folders)
    fetched = _full_shard_gets(local_hub.requests, ids)
    # Two passes (whole-model λ): each shard is fetched once per pass, never more.
    assert n_shards <= len(fetched) <= 2 * n_shards
    # Peak: the shards the current group spans plus one prefetched, per model — not whole models.
    assert 0 < max(on_disk) <= 3 * len(folders) < n_shards, (max(on_disk), n_shards)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_shape_mismatch_fails_before_any_shard_is_downloaded(family, tmp_path, hub_user, local_hub):
    folders, ids = family
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folders[1].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    wm = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    shard = bad / wm[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    repo = f"{hub_user}/bad-shape"
    HfApi().create_repo(repo, exist_ok=True)
    HfApi().upload_folder(repo_id=repo, folder_path=bad)
    local_hub.clear_requests()
    with pytest.raises(IncompatibleModelsError, match="Shape mismatch"):
        hf_metagpt.merge(base=ids[0], models=[repo, ids[2]], output=str(tmp_path / "out"), device="cpu", progress=False)
    assert _full_shard_gets(local_hub.requests) == []
    assert _cached_shards(repo) == []
    assert not (tmp_path / "out").exists()


def test_private_repo_and_missing_revision_give_clear_messages(family, tmp_path, hub_other_token, hub_other_user):
    folders, ids = family
    other = HfApi(token=hub_other_token)
    repo = f"{hub_other_user}/secret-chat"
    other.create_repo(repo, private=True, exist_ok=True)
    other.upload_folder(repo_id=repo, folder_path=folders[1])
    # Another user's private repo, with a token: 404 on the Hub.
    with pytest.raises(HubAccessError, match="not found or private"):
        hf_metagpt.plan(base=ids[0], models=[repo], output="-")
    with pytest.raises(HubAccessError, match="revision not found"):
        hf_metagpt.plan(base=ids[0], models=[f"{ids[1]}@no-such-branch"], output="-")
    # No token at all, through the CLI: one message, exit 2, no traceback.
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "hf_metagpt", "plan", "--base", ids[0], repo],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not found or private" in proc.stderr and "token" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The owner's token opens it.
    plan = hf_metagpt.plan(base=ids[0], models=[repo], output="-", token=hub_other_token)
    assert plan.models[0].ref.sha


def test_token_never_appears_in_output_card_recipe_or_coefficients(family, tmp_path, hub_token, hub_user):
    _, ids = family
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hf_metagpt", "--debug", "merge", "--base", ids[0], *ids[1:], "--output", str(out),
         "--device", "cpu", "--token", hub_token, "--push-to", f"{hub_user}/tok-merge", "--private"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{hub_user}/tok-merge" in proc.stdout
    assert hub_token not in proc.stdout and hub_token not in proc.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert hub_token.encode() not in f.read_bytes(), f.name
    assert HfApi().model_info(f"{hub_user}/tok-merge").private


def test_push_subcommand_uploads_a_folder_and_opens_a_pr(hub_merge, hub_user, capsys, tmp_path):
    import shutil

    from hf_metagpt.cli import main

    out = tmp_path / "merged"
    shutil.copytree(hub_merge[1], out)
    repo = f"{hub_user}/pushed-again"
    assert main(["push", str(out), repo]) == 0
    assert capsys.readouterr().out.strip().endswith(repo)
    api = HfApi()
    head = api.model_info(repo).sha
    files = set(api.list_repo_files(repo))
    assert {"README.md", "metagpt_lambdas.png", "model.safetensors.index.json"} <= files
    (out / "NOTES.md").write_text("evaluated on ...\n")
    assert main(["push", str(out), repo, "--create-pr", "--commit-message", "again"]) == 0
    assert "/discussions/" in capsys.readouterr().out
    assert api.model_info(repo).sha == head  # main untouched by the PR


# ------------------------------------------------------------------ LoRA adapters by Hub ID, -q

@pytest.fixture(scope="module")
def hub_adapters(tmp_path_factory, hub_user):
    from test_lora import ADAPTERS, SPEC, make_adapter

    root = tmp_path_factory.mktemp("hubadapters")
    base, _ = build_family(root, n_models=0, spec=SPEC)
    names = ["ad_plain", "ad_pattern"]
    folders = [make_adapter(base, root / n, seed=20 + i, **ADAPTERS[n]) for i, n in enumerate(names)]
    api = HfApi()
    ids = []
    for name, folder in zip(["base", *names], [base, *folders]):
        repo = f"{hub_user}/lora-{name}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)
        ids.append(repo)
    return base, folders, ids


def test_lora_adapters_by_hub_id_merge_like_local_folders(hub_adapters, tmp_path, local_hub):
    base, folders, ids = hub_adapters
    local = tmp_path / "local"
    hf_metagpt.merge(base=str(base), models=[str(f) for f in folders], output=str(local), device="cpu", progress=False)
    local_hub.clear_requests()
    plan = hf_metagpt.plan(base=ids[0], models=ids[1:], output="-")
    assert [m.ref.is_adapter for m in plan.models] == [True, True]
    assert all(m.ref.sha and len(m.ref.sha) == 40 for m in plan.models)
    # Adapter files are fetched at the pinned commit; the base's shards are not (headers only).
    adapter_reads = [r.path for r in local_hub.requests if "/resolve/" in r.path and "/lora-ad_" in r.path]
    assert adapter_reads and all(f"/resolve/{plan.models[0].ref.sha}/" in p or f"/resolve/{plan.models[1].ref.sha}/" in p
                                 for p in adapter_reads)
    assert _full_shard_gets(local_hub.requests, [ids[0]]) == []

    out = tmp_path / "hub"
    result = hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(out), device="cpu", progress=False)
    assert _shard_bytes(out) == _shard_bytes(local)
    local_groups = json.loads((local / "metagpt_coefficients.json").read_text())["groups"]
    assert result.coefficients == {g: v["lambdas"] for g, v in local_groups.items()}
    # Lineage: adapters are inputs, so they are in base_model; the card and coefficients say which.
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ids and card.data.base_model_relation == "merge"
    assert f"| LoRA adapter 1 | [`{ids[1]}`]" in card.text and f"| LoRA adapter 2 | [`{ids[2]}`]" in card.text
    assert "2 of the inputs are PEFT LoRA adapters" in card.text
    coeffs = json.loads((out / "metagpt_coefficients.json").read_text())
    assert [m.get("adapter") for m in coeffs["models"]] == [True, True] and "adapter" not in coeffs["base"]
    assert [m["sha"] for m in coeffs["models"]] == [m.sha for m in result.models]
    recipe = yaml.safe_load((out / "hf_metagpt_recipe.yaml").read_text())
    assert recipe["models"] == [f"{m.repo_id}@{m.sha}" for m in result.models]
    # --low-disk reads the adapters from the Hub cache in place (only base shards are fetched and dropped).
    hf_metagpt.merge(base=ids[0], models=ids[1:], output=str(tmp_path / "ld"), device="cpu", progress=False,
                     low_disk=True)
    assert _shard_bytes(tmp_path / "ld") == _shard_bytes(local)


def test_quiet_after_the_subcommand_silences_the_hub_header_bars(family, hub_user, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled

    from hf_metagpt.cli import main

    folders, _ = family
    ids = _upload_family(HfApi(), hub_user, "quiet", folders)
    capsys.readouterr()
    assert main(["plan", "--base", ids[0], *ids[1:]]) == 0
    # headers are read one retried call per shard (hub._remote_headers): no library bar for them at all
    assert "Parse safetensors files" not in capsys.readouterr().err
    ids = _upload_family(HfApi(), hub_user, "quiet2", folders)  # fresh repos: headers read again
    assert main(["plan", "--base", ids[0], *ids[1:], "-q"]) == 0
    captured = capsys.readouterr()
    assert "Parse safetensors files" not in captured.err and "%|" not in captured.err
    assert ids[0] in captured.out
    assert not are_progress_bars_disabled()  # put back after the command
