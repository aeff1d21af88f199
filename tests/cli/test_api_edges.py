"""The Python API's edges (issue 13): paths, options, the public recipe and card, push, exceptions."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from safetensors.torch import save_file

import hf_metagpt
from hf_metagpt import cli
from hf_metagpt.engine.stats import StreamStats
from hf_metagpt.errors import MergeError, OutputError, RecipeError
from hf_metagpt.options import MergeOptions, build_options, parse_recipe, public_recipe
from hf_metagpt.publish.card import build_card, write_card
from hf_metagpt.publish.push import check_push_access, push, push_refusal
from hf_metagpt.result import MergeResult
from hf_metagpt.errors import HubAccessError
from hf_metagpt.sources.refs import ModelRef


@pytest.fixture(scope="module")
def family(tiny_family) -> tuple[Path, list[Path]]:
    return tiny_family(n_models=2)


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory) -> tuple[MergeResult, Path]:
    """One merge through the Python API with `pathlib.Path` everywhere a path goes."""
    base, fts = family
    out = tmp_path_factory.mktemp("edges-merged") / "merged"
    result = hf_metagpt.merge(base=base, models=list(fts), output=out, progress=False, max_shard_size="100KB")
    return result, out


# ---- paths as os.PathLike ----------------------------------------------------------------------
def test_merge_takes_pathlib_paths_for_base_models_and_output(family, merged):
    base, fts = family
    result, out = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert result.output == out
    # Written as strings (PathLike crashed the YAML dump after the whole merge), and published
    # without this machine's paths: the inputs by folder name, no output.
    text = (out / "hf_metagpt_recipe.yaml").read_text()
    assert text.splitlines()[0] == f"# made with hf-metagpt {hf_metagpt.__version__}"
    assert yaml.safe_load(text) == {"base": "base", "models": [p.name for p in fts], "max_shard_size": "100KB"}


def test_options_keep_pathlike_values_as_strings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: linear\n")
    opts = build_options(recipe, base=tmp_path / "b", models=(tmp_path / "m1", tmp_path / "m2"),
                         output=tmp_path / "o", tokenizer_source=tmp_path / "m1")
    assert (opts.base, opts.output, opts.tokenizer_source) == (str(tmp_path / "b"), str(tmp_path / "o"),
                                                               str(tmp_path / "m1"))
    assert opts.models == [str(tmp_path / "m1"), str(tmp_path / "m2")]
    assert opts.method == "linear"
    direct = MergeOptions(base=tmp_path / "b", models=[tmp_path / "m1"], output=tmp_path / "o")
    assert (direct.base, direct.models, direct.output) == (str(tmp_path / "b"), [str(tmp_path / "m1")],
                                                           str(tmp_path / "o"))
    with pytest.raises(RecipeError, match="models must be a list"):
        MergeOptions(base="b", models=tmp_path / "m1")


# ---- validate() for plan ----------------------------------------------------------------------
def test_validate_for_plan_needs_no_output():
    opts = MergeOptions(base="base/", models=["chat/"])
    opts.validate(for_merge=False)  # laying out a merge writes nothing
    with pytest.raises(RecipeError, match="No output folder given") as info:
        opts.validate()
    assert "output=" in info.value.hint and "--output DIR" in info.value.hint
    assert build_options(base="base/", models=["chat/"], for_merge=False).output == ""


# ---- the public recipe and the card ----------------------------------------------------------
def _refs(tmp_path: Path) -> tuple[ModelRef, ModelRef, ModelRef]:
    hub_base = ModelRef(spec="org/base", repo_id="org/base", revision=None, sha="a" * 40)
    chat = ModelRef(spec=str(tmp_path / "models" / "chat"), local_path=tmp_path / "models" / "chat")
    math = ModelRef(spec="org/math@v1", repo_id="org/math", revision="v1", sha="b" * 40)
    return hub_base, chat, math


def test_public_recipe_pins_hub_inputs_names_local_folders_and_drops_output(tmp_path):
    base, chat, math = _refs(tmp_path)
    opts = MergeOptions(base="org/base", models=[chat.spec, "org/math@v1"], output=str(tmp_path / "out"),
                        method="ties", parameters={"density": 0.5}, tokenizer_source=chat.spec,
                        push_to="me/merged", token="hf_secret", overwrite=True, private=True)
    text = public_recipe(opts, base, [chat, math])
    assert text.splitlines()[0] == f"# made with hf-metagpt {hf_metagpt.__version__}"
    assert str(tmp_path) not in text and "hf_secret" not in text
    assert yaml.safe_load(text) == {"base": "org/base@" + "a" * 40, "models": ["chat", "org/math@" + "b" * 40],
                                    "method": "ties", "parameters": {"density": 0.5}, "tokenizer_source": "chat"}
    assert parse_recipe(text)["models"] == ["chat", "org/math@" + "b" * 40]  # still a valid --recipe


def _result(tmp_path: Path, recipe: str, **kwargs) -> MergeResult:
    base, chat, math = _refs(tmp_path)
    local_base = ModelRef(spec=str(tmp_path / "models" / "base"), local_path=tmp_path / "models" / "base")
    return MergeResult(
        output=tmp_path / "out" / "merged", base=local_base, models=[chat, math], method="ties",
        parameters={"density": 0.5}, granularity="model", seed=None, coefficients={"model": [0.5, 0.5]},
        sq_norms={}, stats=StreamStats(), out_dtype="BF16", recipe=recipe, **kwargs,
        warnings=[f"{chat.spec} contributes almost nothing"],
    )


def test_card_names_local_inputs_by_folder_and_never_the_output_path(tmp_path):
    # The recipe as api.py wrote it so far: absolute input paths and the output folder.
    leaky = yaml.safe_dump({"base": str(tmp_path / "models" / "base"),
                            "models": [str(tmp_path / "models" / "chat"), "org/math@" + "b" * 40],
                            "output": str(tmp_path / "out" / "merged"), "method": "ties"}, sort_keys=False)
    text = str(build_card(_result(tmp_path, leaky)))
    assert str(tmp_path) not in text
    assert "output:" not in text
    assert f"hf-metagpt {hf_metagpt.__version__}" in text
    recipe = yaml.safe_load(text.split("## Reproduce it", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe == {"base": "base", "models": ["chat", "org/math@" + "b" * 40], "method": "ties"}
    assert "`chat` (local folder)" in text and "- chat contributes almost nothing" in text


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_card_states_the_precision_the_engine_used(tmp_path, precision):
    text = str(build_card(_result(tmp_path, "method: ties\n", precision=precision)))
    assert f"accumulated in {precision}" in text
    other = {"float64": "float32", "float32": "float64"}[precision]
    assert f"accumulated in {other}" not in text
    assert json.loads(json.dumps(_result(tmp_path, "", precision=precision).to_json()))["precision"] == precision


def test_coefficients_file_names_local_inputs_by_folder(tmp_path):
    data = _result(tmp_path, "").to_json()
    assert [m["ref"] for m in data["models"]] == ["chat", "org/math@" + "b" * 40]
    assert data["base"]["ref"] == "base"


def test_merged_card_and_coefficients_carry_no_local_path(family, merged):
    base, _ = family
    result, out = merged
    root = str(base.parent)
    card = (out / "README.md").read_text()
    assert root not in card and str(out) not in card and "output:" not in card
    assert root not in (out / "metagpt_coefficients.json").read_text()
    assert f"hf-metagpt {hf_metagpt.__version__}" in card


def test_writing_a_card_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend that is not Agg: a forced switch to Agg would show
    try:
        folder = tmp_path / "card"
        folder.mkdir()
        write_card(dataclasses.replace(_result(tmp_path, "method: metagpt\n"), method="metagpt"), folder)
        assert matplotlib.get_backend() == "pdf"
        assert (folder / "metagpt_lambdas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


# ---- --num-processes keeps the token off command lines ---------------------------------------
@pytest.mark.parametrize("token_args", [["--token", "hf_secret_value"], ["--token=hf_secret_value"]])
def test_launch_passes_the_token_in_the_environment_not_the_command_line(monkeypatch, token_args):
    import subprocess as sp

    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    argv = ["merge", "chat/", "--base", "base/", "-o", "out/", "--num-processes", "2", "--device", "cpu",
            *token_args, "--seed", "3"]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    assert cli._launch(args, cli._options_from_args(args)) == 0
    (cmd, env), = calls
    assert not any("hf_secret_value" in part for part in cmd)
    assert env["HF_TOKEN"] == "hf_secret_value"
    tail = cmd[cmd.index("hf_metagpt") + 1:]
    assert tail == ["merge", "chat/", "--base", "base/", "-o", "out/", "--device", "cpu", "--seed", "3"]


def test_child_argv_keeps_a_model_after_a_double_dash():
    assert cli.child_argv(["merge", "--token", "x", "--num-processes=2", "--", "--token"]) == \
        ["merge", "--", "--token"]


# ---- small ones ---------------------------------------------------------------------------------
def test_recipe_list_error_says_what_was_expected():
    with pytest.raises(RecipeError) as info:
        parse_recipe("base: x\nmodels: [1, 2]\n", "r.yaml")
    assert str(info.value) == ("Recipe key 'models' (r.yaml, line 2) has the wrong type: list of int.\n"
                               "  hint: Expected a list of str.")


def test_exponent_numbers_are_floats_in_params_and_recipes():
    args = cli.build_parser().parse_args(["merge", "m/", "--base", "b/", "-o", "o/", "--method", "ties",
                                          "--param", "density=1e-9", "--param", "weights=[1e-1, 2E-1]"])
    opts = cli._options_from_args(args)
    assert opts.parameters == {"density": 1e-9, "weights": [0.1, 0.2]}
    assert isinstance(opts.parameters["density"], float)
    assert parse_recipe("parameters: {density: 1e-9, name: abc1e5}\n")["parameters"] == {"density": 1e-9,
                                                                                          "name": "abc1e5"}


def test_malformed_param_value_is_a_merge_error():
    args = cli.build_parser().parse_args(["merge", "m/", "--base", "b/", "-o", "o/", "--param", "weights=[0.5,"])
    with pytest.raises(MergeError, match=r"Bad --param value for 'weights': '\[0.5,'"):
        cli._options_from_args(args)


def test_mistyped_local_path_names_the_closest_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "chat").mkdir(parents=True)
    with pytest.raises(HubAccessError) as info:
        hf_metagpt.plan(base="models/chta", models=["models/chat"], output="-")
    assert "models/chta: repository not found" in str(info.value)
    assert "no such folder exists; the closest is 'models/chat'" in info.value.hint


def test_peak_rss_bytes_with_and_without_the_resource_module(monkeypatch):
    import psutil

    from hf_metagpt._platform import peak_rss_bytes

    if sys.platform.startswith("linux"):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        peak = peak_rss_bytes()
        assert before <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # the kernel's high-water mark lags the current RSS by a few pages at most
        assert peak >= psutil.Process().memory_info().rss - 4 * 2**20
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: `import resource` fails
    fallback = peak_rss_bytes()
    assert abs(fallback - psutil.Process().memory_info().rss) < 64 * 2**20


def test_package_imports_where_resource_does_not_exist():
    code = "import sys; sys.modules['resource'] = None; import hf_metagpt; print(hf_metagpt.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == hf_metagpt.__version__


# ---- the package's public names -------------------------------------------------------------------
def test_exceptions_are_exported_from_the_package():
    names = ["MergeError", "InputError", "IncompatibleModelsError", "OutputError", "RecipeError",
             "NonFiniteError", "IntegrityError", "HubAccessError", "HubUnavailableError"]
    assert set(names) <= set(hf_metagpt.__all__)
    for name in names:
        assert issubclass(getattr(hf_metagpt, name), hf_metagpt.MergeError)
    assert hf_metagpt.HubAccessError is HubAccessError
    assert issubclass(hf_metagpt.HubUnavailableError, hf_metagpt.HubAccessError)


# ---- publishing -----------------------------------------------------------------------------------
def _model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    return folder


def test_push_never_uploads_dotfiles_or_env_files(tmp_path, hub_user):
    folder = _model_folder(tmp_path / "merged")
    (folder / ".env").write_text("HF_TOKEN=hf_leaked\n")
    (folder / "deploy.env").write_text("SECRET=1\n")
    (folder / "sub").mkdir()
    (folder / "sub" / ".netrc").write_text("machine x password y\n")
    (folder / "sub" / "notes.txt").write_text("kept\n")
    push(folder, f"{hub_user}/edges-dotfiles")
    files = set(HfApi().list_repo_files(f"{hub_user}/edges-dotfiles"))
    assert {"config.json", "model.safetensors", "sub/notes.txt"} <= files
    assert not files & {".env", "deploy.env", "sub/.netrc"}


def test_result_push_to_hub_uploads_the_merge_and_points_its_card_at_the_repo(merged, hub_user):
    result, out = merged
    repo = f"{hub_user}/edges-push-to-hub"
    url = result.push_to_hub(repo, commit_message="from the API")
    assert url.rstrip("/").endswith(repo) and result.pushed_url == url
    api = HfApi()
    files = set(api.list_repo_files(repo))
    assert {"model.safetensors.index.json", "metagpt_coefficients.json", "README.md"} <= files
    assert api.list_repo_commits(repo)[0].title == "from the API"
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert f'from_pretrained("{repo}"' in card and 'from_pretrained("./merged"' not in card


def test_push_to_hub_without_an_output_folder_is_an_output_error(tmp_path):
    result = _result(tmp_path, "")
    with pytest.raises(OutputError, match="Nothing to push"):
        result.push_to_hub("me/x")


# ---- push permission, before any weight is read -------------------------------------------------
def test_push_access_passes_for_own_namespace_and_member_org(hub_token, hub_user):
    check_push_access(f"{hub_user}/edges-new-repo", hub_token)
    check_push_access("testorg/edges-new-repo", hub_token)


def test_push_access_refuses_an_org_the_user_is_not_in(hub_other_token, hub_other_user):
    with pytest.raises(HubAccessError) as info:
        check_push_access("testorg/edges-not-mine", hub_other_token)
    assert info.value.message == ("Pushing to testorg/edges-not-mine: 'other' cannot create a repo in 'testorg' "
                                  "(not the user's namespace nor one of its organizations).")
    assert f"{hub_other_user}/edges-not-mine" in info.value.hint


def test_push_access_to_someone_elses_repo_needs_create_pr(hub_token, hub_user, hub_other_token):
    repo = f"{hub_user}/edges-existing"
    HfApi(token=hub_token).create_repo(repo, exist_ok=True)
    with pytest.raises(HubAccessError, match="'other' cannot write to 'tester'") as info:
        check_push_access(repo, hub_other_token)
    assert "--create-pr (create_pr=True)" in info.value.hint
    check_push_access(repo, hub_other_token, create_pr=True)  # reading the repo is enough for a PR


def test_push_access_refuses_an_invalid_or_missing_token(monkeypatch, hub_user):
    with pytest.raises(HubAccessError, match="token is invalid or expired"):
        check_push_access(f"{hub_user}/x", "hf_not_a_token")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAccessError, match="needs a Hub token, and none was found"):
        check_push_access(f"{hub_user}/x", None)


def _whoami(role: str, orgs: list[dict] | None = None, fine: dict | None = None) -> dict:
    token = {"displayName": "t", "role": role}
    if fine is not None:
        token["fineGrained"] = fine
    return {"type": "user", "name": "alice", "orgs": orgs or [], "auth": {"type": "access_token", "accessToken": token}}


def test_push_refusal_reads_the_hubs_whoami_answer():
    assert push_refusal(_whoami("write"), "alice/m", exists=False) is None
    assert push_refusal(_whoami("write"), "m", exists=False) is None  # a bare name: the user's namespace
    message, hint = push_refusal(_whoami("read"), "alice/m", exists=True)
    assert message == "Pushing to alice/m: the token of 'alice' is read-only."
    assert hint == "Use a token with write access (--token / token=..., HF_TOKEN or `hf auth login`)."
    assert push_refusal(_whoami("read"), "bob/m", exists=True, create_pr=True) is not None  # no PR either
    assert push_refusal(_whoami("write"), "bob/m", exists=True, create_pr=True) is None
    reader = [{"name": "lab", "roleInOrg": "read"}]
    assert push_refusal(_whoami("write", reader), "lab/m", exists=False)[0] == \
        "Pushing to lab/m: 'alice' has the read role in the organization 'lab'."
    assert push_refusal(_whoami("write", [{"name": "lab", "roleInOrg": "write"}]), "lab/m", exists=False) is None
    scoped = {"global": [], "scoped": [{"entity": {"type": "user", "name": "alice"},
                                        "permissions": ["repo.content.read", "repo.write"]}]}
    assert push_refusal(_whoami("fineGrained", fine=scoped), "alice/m", exists=False) is None
    read_only = {"global": [], "scoped": [{"entity": {"type": "user", "name": "alice"},
                                           "permissions": ["repo.content.read"]}]}
    assert "no write permission" in push_refusal(_whoami("fineGrained", fine=read_only), "alice/m", exists=False)[0]
