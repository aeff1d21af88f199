"""What a user meets first at the command line (issue [users]): quiet output, no signed URL in any
log line, clear messages for guessed parameters and mergekit habits, no tracebacks.

Every CLI test here runs `python -m hf_metagpt` in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import publish

ROOT = Path(__file__).resolve().parents[2]

#: what a signed URL carries (S3, CloudFront, the Hub's CDN and Xet bridge, the local Hub's LFS upload)
SIGNED = re.compile(r"X-Amz-Signature|X-Amz-Credential|[?&](Expires|Signature|Policy|Key-Pair-Id|sig|token)=",
                    re.IGNORECASE)


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
        stdin=None) -> subprocess.CompletedProcess:
    """`python -m hf_metagpt ARGS` in a new interpreter that imports this checkout."""
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "hf_metagpt", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout, stdin=stdin)


def clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit code 2 and one `error:` message holding every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-3000:])
    return proc.stderr


@pytest.fixture(scope="module")
def family(tiny_family) -> tuple[Path, list[Path]]:
    return tiny_family(n_models=2)


@pytest.fixture(scope="module")
def hub_family(family, hub_user) -> list[str]:
    base, fts = family
    return publish([base, *fts], hub_user, "userscli")


# ---- item 3 / D8: quiet means quiet; no signed URL in any log line ----------------------------------

def _bars(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if re.search(r"\d+%\|", line)]


#: huggingface_hub draws its bars only on a terminal unless TQDM_POSITION=-1 forces them on: with it, a
#: bar per file it downloads or uploads would show in the captured stderr too
BARS_ON = {"TQDM_POSITION": "-1"}


def _stage_bars(text: str) -> dict[str, list[str]]:
    """Each bar's description and its lines (tqdm redraws a bar in place with \r)."""
    bars: dict[str, list[str]] = {}
    for line in re.split(r"[\r\n]", text):
        m = re.match(r"^\s*(?P<desc>.+?):\s+(?:\d+%\||[\d.]+\s?[kMG]?B \[)", line)
        if m:
            bars.setdefault(m["desc"], []).append(line.strip())
    return bars


@pytest.mark.slow
def test_quiet_by_id_merge_and_push_prints_the_summary_only(hub_family, hub_user, tmp_path):
    base, *fts = hub_family
    proc = cli("-q", "merge", *fts, "--base", base, "-o", str(tmp_path / "m"), "--push-to", f"{hub_user}/uq-pushed",
               env=BARS_ON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HTTP Request" not in proc.stderr and "HTTP Request" not in proc.stdout
    assert _bars(proc.stderr) == [], proc.stderr[-3000:]
    assert "Matplotlib" not in proc.stderr and "font cache" not in proc.stderr
    assert not SIGNED.search(proc.stderr + proc.stdout)
    assert proc.stderr == ""  # nothing but the summary, on stdout
    assert "Merged 2 model" in proc.stdout and f"Pushed: " in proc.stdout and "| model |" in proc.stdout


def test_default_verbosity_shows_no_http_requests_and_one_bar_per_stage(family, hub_user, tmp_path):
    base, *fts = publish([family[0], *family[1]], hub_user, "u3stages")  # repos of its own: nothing cached yet
    proc = cli("merge", *fts, "--base", base, "-o", str(tmp_path / "m"), "--push-to", f"{hub_user}/u3-stages",
               env=BARS_ON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HTTP Request" not in proc.stderr
    assert "Parse safetensors files" not in proc.stderr  # one bar per model, repeated: not a stage of ours
    assert not SIGNED.search(proc.stderr + proc.stdout)
    bars = _stage_bars(proc.stderr)
    # one bar per stage: the side files (3 models), the shards (4 per model: 12 files), the two passes, the
    # upload (a dozen files) -- no bar per file, no "Fetching N files"/"Upload N LFS files" of huggingface_hub
    assert sorted(bars) == ["download", "download shards", "pass 1/2: norms", "pass 2/2: merge", "upload"], bars.keys()
    for stage in ("download", "download shards", "upload"):
        assert re.search(r"100%\|█+\| [\d.]+[kM]?/[\d.]+[kM]? ", bars[stage][-1]), bars[stage]  # all bytes, ends full
    from tqdm import tqdm

    local_base, local_fts = family  # the folders published as the three repos
    shards = sum(f.stat().st_size for d in [local_base, *local_fts] for f in d.glob("model-*.safetensors"))
    assert len(list(local_base.glob("model-*.safetensors"))) > 1  # several files per model, one bar
    size = tqdm.format_sizeof(shards)
    assert f"| {size}/{size} [" in bars["download shards"][-1], (size, bars["download shards"][-1])


def test_verbose_shows_requests_but_never_a_signed_url(hub_family, hub_user, tmp_path):
    base, *fts = hub_family
    # another method than the other tests': other bytes, so the push really uploads (no dedup)
    # an empty Hub cache of its own: the reads through signed storage URLs happen in this run
    proc = cli("-v", "merge", *fts, "--base", base, "-o", str(tmp_path / "m"), "--method", "linear",
               "--push-to", f"{hub_user}/uv-pushed", env={"HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HTTP Request" in proc.stderr  # -v shows the library's requests ...
    # ... the reads that follow a 302 to a signed storage URL among them (over Xet, the default) ...
    assert "/cdn/lfs/" in proc.stderr
    assert not SIGNED.search(proc.stderr + proc.stdout), [
        line for line in proc.stderr.splitlines() if SIGNED.search(line)]  # ... without its signature


def test_debug_never_logs_a_signed_url(hub_family, hub_user, tmp_path):
    base, *fts = hub_family
    proc = cli("--debug", "-q", "merge", *fts, "--base", base, "-o", str(tmp_path / "m"), "--method", "task_arithmetic",
               "--push-to", f"{hub_user}/ud-pushed", env={"HF_DEBUG": "1", "HF_HUB_DISABLE_XET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/_lfs/" in proc.stderr  # the HTTP-only path (HF_HUB_DISABLE_XET=1): git-LFS uploads to signed URLs
    assert not SIGNED.search(proc.stderr + proc.stdout), [
        line for line in proc.stderr.splitlines() if SIGNED.search(line)]


def test_redaction_keeps_plain_urls_and_hides_every_signature():
    from hf_metagpt._logging import redact

    plain = "GET https://huggingface.co/api/models/org/x/revision/main?expand=siblings"
    assert redact(plain) == plain
    for url in ["https://cdn-lfs.hf.co/repos/a/b/c?response-content-disposition=x&Expires=1&Signature=abc&Key-Pair-Id=K",
                "https://s3.amazonaws.com/b/k?X-Amz-Algorithm=A&X-Amz-Credential=C&X-Amz-Signature=S",
                "https://cas-bridge.xethub.hf.co/x?X-Xet-Signed-Range=1&Policy=P&Signature=S",
                "http://127.0.0.1:1/_lfs/oid?size=3&repo=r&sig=deadbeef",
                "https://example.org/dl?token=hf_secret"]:
        out = redact(f'HTTP Request: PUT {url} "HTTP/1.1 200 OK"')
        assert not SIGNED.search(out), out
        assert url.split("?")[0] in out and out.endswith('"HTTP/1.1 200 OK"')
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in redact("Authorization: Bearer hf_abcdefghijklmnopqrstuvwxyz")


def test_python_progress_false_shows_no_bar_at_all(hub_family, tmp_path):
    base, *fts = hub_family
    code = ("import hf_metagpt, sys\n"
            f"r = hf_metagpt.merge(base={base!r}, models={fts!r}, output={str(tmp_path / 'm')!r}, progress=False)\n"
            "print('done')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **BARS_ON)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _bars(proc.stderr) == [] and _stage_bars(proc.stderr) == {}, proc.stderr[-3000:]
    assert "it/s" not in proc.stderr and "Parse safetensors" not in proc.stderr


# ---- item 9: parameters a user can guess -------------------------------------------------------------

def test_density_with_the_default_method_names_the_methods_that_take_it(family, tmp_path):
    base, fts = family
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--param", "density=0.5")
    err = clean_error(proc, "'metagpt'", "density", "--method ties", "weights=[0.3,0.7]")
    assert "unexpected keyword" not in err and "__init__" not in err
    assert "takes no parameters" in err  # what the default method does take
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_near_misses_get_a_did_you_mean_and_only_user_facing_names(family, tmp_path):
    base, fts = family
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--method", "linear",
               "--param", "weight=[0.3,0.7]")
    err = clean_error(proc, "'weight'", "Did you mean 'weights'?", "weights=[0.3,0.7]")
    for internal in ("mergekit_order", "per_model", "lambda_", "drop_rate"):
        assert internal not in err, err
    proc = cli("plan", *map(str, fts), "--base", str(base), "--method", "tie")
    clean_error(proc, "Unknown merge method 'tie'", "Did you mean 'ties'?")
    proc = cli("plan", *map(str, fts), "--base", str(base), "--method", "ties", "--param", "lambda_=2",
               "--param", "densty=0.3")
    err = clean_error(proc, "'densty'", "Did you mean 'density'?")
    assert "lambda_" not in err.split("hint:", 1)[1].replace("'lambda_'", "")  # listed as `lambda`


def test_method_names_are_case_insensitive(family, tmp_path):
    base, fts = family
    proc = cli("-q", "merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--method", "TIES",
               "--param", "density=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "o" / "metagpt_coefficients.json").read_text())["method"] == "ties"
    assert "method: ties" in (tmp_path / "o" / "hf_metagpt_recipe.yaml").read_text()


def test_python_parameters_as_a_string_is_a_type_error_with_a_hint(family, tmp_path):
    import hf_metagpt

    base, fts = family
    with pytest.raises(TypeError) as info:
        hf_metagpt.plan(base=str(base), models=[str(f) for f in fts], method="ties", parameters="density=0.5")
    assert "parameters" in str(info.value) and "{'density': 0.5}" in str(info.value)
    assert "must be a mapping" not in str(info.value)


def test_merge_help_lists_every_method_with_one_line_and_two_examples():
    from hf_metagpt.methods import METHODS

    proc = cli("merge", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for name in METHODS:
        assert re.search(rf"^\s+{name}\s+\S", text, re.MULTILINE), name
    examples = [line for line in text.splitlines() if line.strip().startswith("hf-metagpt merge ")]
    assert len(examples) >= 2, text
    assert "--method ties --param density=0.5" in text


def test_version():
    import hf_metagpt

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hf-metagpt {hf_metagpt.__version__}", proc


# ---- item 6: no tracebacks; nothing created before the name is checked ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("target", ["my model", "me/my model", "a/b/c", "me/"])
def test_invalid_push_target_is_refused_before_anything_is_read(family, tmp_path, target):
    base, fts = family
    # a base on a Hub that does not answer: the refusal must come before any request
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--push-to", target,
               env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    err = clean_error(proc, f"{target!r}", "ORG/NAME")
    assert "HFValidationError" not in err and "Hub kept failing" not in err
    assert not (tmp_path / "o").exists()
    proc = cli("push", str(tmp_path), target, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    clean_error(proc, f"{target!r}", "ORG/NAME")


@pytest.mark.slow
def test_push_to_a_bare_name_goes_to_the_users_namespace_and_leaves_no_empty_repo(family, hub_user, tmp_path):
    from huggingface_hub import HfApi

    base, fts = family
    proc = cli("-q", "merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"),
               "--push-to", "bare-name-p02b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"/{hub_user}/bare-name-p02b" in proc.stdout
    files = HfApi().list_repo_files(f"{hub_user}/bare-name-p02b")
    assert "config.json" in files and "README.md" in files
    # `push DIR NAME` the same way
    proc = cli("push", str(tmp_path / "o"), "bare-name-p02c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config.json" in HfApi().list_repo_files(f"{hub_user}/bare-name-p02c")


@pytest.mark.parametrize("flag", [["--create-pr"], ["--private"], ["--revision", "dev"], ["--commit-message", "m"]])
def test_push_options_without_push_to_are_refused_before_the_first_read(family, tmp_path, flag):
    base, fts = family
    proc = cli("merge", *map(str, fts), "--base", "nobody/not-there", "-o", str(tmp_path / "o"), *flag,
               env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    clean_error(proc, flag[0], "--push-to")


def test_inspect_json_into_a_closed_pipe_is_not_a_traceback(family):
    base, fts = family
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "hf_metagpt", "-q", "inspect", "--json", *map(str, fts),
                             "--base", str(base)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head -c 100` that has read its 100 bytes
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=600)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]
    assert code == 141, (code, err[-3000:])


# ---- item 5: mergekit habits ----------------------------------------------------------------------------

def _recipe(tmp_path: Path, base: Path, fts: list[Path]) -> Path:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: " + str(base) + "\nmodels:\n"
                      + "".join(f"  - model: {f}\n    parameters:\n      weight: 0.5\n" for f in fts)
                      + "dtype: float32\n")
    return recipe


@pytest.mark.slow
def test_mergekit_yaml_positional_style_is_accepted(family, tmp_path):
    base, fts = family
    recipe = _recipe(tmp_path, base, fts)
    out = tmp_path / "out"
    proc = cli("-q", "merge", str(recipe), str(out))  # mergekit-yaml RECIPE.yml OUT
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    ref = tmp_path / "ref"
    proc = cli("-q", "merge", "--recipe", str(recipe), "-o", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from helpers import shards

    assert shards(out) == shards(ref)  # the same merge as --recipe/-o


def test_a_recipe_among_models_points_to_recipe_and_output(family, tmp_path):
    base, fts = family
    recipe = _recipe(tmp_path, base, fts)
    proc = cli("merge", str(recipe), str(tmp_path / "o"), "--base", str(base))
    clean_error(proc, "recipe.yml", "--recipe", "-o")
    proc = cli("merge", str(recipe), str(fts[0]), str(tmp_path / "o"))
    clean_error(proc, "recipe.yml", "--recipe", "-o")


def test_mergekit_shard_size_in_parameters_is_refused_clearly(family, tmp_path):
    base, fts = family
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--max-shard-size", "5B")
    clean_error(proc, "'5B'", "5 billion parameters", "5GB")
    assert not (tmp_path / "o").exists()
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), "--out-shard-size", "5B")
    clean_error(proc, "--out-shard-size", "--max-shard-size")


@pytest.mark.parametrize("flag, reason", [("--allow-crimes", "architecture"), ("--trust-remote-code", "code")])
def test_mergekit_flags_get_an_answer(family, tmp_path, flag, reason):
    base, fts = family
    proc = cli("merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o"), flag)
    err = clean_error(proc, flag, reason)
    assert "unrecognized arguments" not in err


def test_option_names_are_derived_from_the_parser():
    """Every merge flag whose destination is a MergeOptions field reaches the options (no hand-kept list)."""
    import argparse
    import dataclasses

    from hf_metagpt.cli import build_parser, options_from_args
    from hf_metagpt.options import MergeOptions

    parser = build_parser()
    merge_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["merge"]
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    strings = {"base": "b", "output": "o", "push_to": "me/x", "revision": "dev", "commit_message": "msg",
               "tokenizer_source": "base", "chat_template": "auto", "max_shard_size": "2GB", "method": "linear",
               "token": "hf_x"}
    argv, expected = ["merge", "m1"], {}
    for action in merge_parser._actions:
        if action.dest not in fields or not action.option_strings or action.dest == "create_pr":
            continue  # (--create-pr: a pull request is against main, not --revision dev)
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
            expected[action.dest] = True
        elif action.choices:
            argv += [flag, list(action.choices)[-1]]
            expected[action.dest] = list(action.choices)[-1]
        elif action.type is int:
            argv += [flag, "3"]
            expected[action.dest] = 3
        else:
            argv += [flag, strings[action.dest]]
            expected[action.dest] = strings[action.dest]
    assert len(expected) >= 20, expected
    expected["output_format"], expected["lora_rank"] = "lora", 3  # the one pair that must agree
    argv += ["--output-format", "lora"]
    opts = options_from_args(parser.parse_args(argv))
    assert {k: getattr(opts, k) for k in expected} == expected


# ---- item 8: the extension manifest cannot be updated from someone else's repository ----------------------

#: GitHub's rule for user and organization names: alphanumerics and single inner hyphens, 39 at most
GITHUB_OWNER = re.compile(r"^[A-Za-z0-9](?:-?[A-Za-z0-9]){0,38}$")


def test_extension_manifest_names_a_source_nobody_can_own_and_update_skips_it(tmp_path, monkeypatch):
    import json
    import shutil

    import httpx2
    from huggingface_hub.cli import extensions

    from hf_metagpt.extension import install_extension

    if shutil.which("hf-metagpt") is None:
        pytest.fail("the hf-metagpt console script must be installed (pip install -e .)")
    monkeypatch.setenv("HOME", str(tmp_path))
    ext_dir = tmp_path / ".local/share/hf/extensions/hf-metagpt"
    # an older registration (source local/hf-metagpt: a GitHub name anyone could register) is replaced
    extensions.ExtensionManifest(owner="local", repo="hf-metagpt", repo_id="local/hf-metagpt", short_name="metagpt",
                                 executable_path=shutil.which("hf-metagpt"), type="python",
                                 installed_at=extensions.datetime.now()).save(ext_dir)
    script = install_extension()
    manifest = json.loads((ext_dir / "manifest.json").read_text())
    assert Path(manifest["executable_path"]) == script
    assert not GITHUB_OWNER.match(manifest["owner"]), manifest  # no GitHub account or org can have it
    assert manifest["repo_id"] == f"{manifest['owner']}/{manifest['repo']}"
    before = (ext_dir / "manifest.json").read_bytes()

    asked: list[str] = []

    def github(method, url, **kwargs):  # GitHub's answer for an owner that does not exist
        asked.append(url)
        request = httpx2.Request(method, url)
        raise httpx2.HTTPStatusError("404 Not Found", request=request, response=httpx2.Response(404, request=request))

    installs: list = []
    monkeypatch.setattr(extensions, "_github_request", github)
    monkeypatch.setattr(extensions, "_install_extension", lambda **kw: installs.append(kw))
    status = extensions._update_installed_extension(extensions.ExtensionManifest.load(ext_dir))
    assert status == extensions._ExtensionUpdateStatus.SKIPPED and installs == []
    assert asked and all(f"/{manifest['owner']}/" in u for u in asked)
    assert (ext_dir / "manifest.json").read_bytes() == before


# ---- item 10: verify's advice ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(family, tmp_path_factory) -> Path:
    base, fts = family
    out = tmp_path_factory.mktemp("verify") / "merged"
    proc = cli("-q", "merge", *map(str, fts), "--base", str(base), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_verify_against_inputs_in_another_order_says_so(family, merged):
    base, fts = family
    proc = cli("verify", str(merged), "--against", str(base), str(fts[1]), str(fts[0]))
    err = clean_error(proc, "another order", f"--against base {fts[0].name} {fts[1].name}")
    assert "re-run the merge" not in err
    proc = cli("verify", str(merged), "--against", str(base), *map(str, fts))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_verify_of_a_lora_output_explains_instead_of_advising_a_rerun(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    err = clean_error(cli("verify", str(folder)), "LoRA adapter", "peft")
    assert "re-run the merge" not in err.lower()


@pytest.mark.slow
def test_verify_against_hub_ids_reads_their_cached_files(hub_family, tmp_path):
    from huggingface_hub import snapshot_download

    base, *fts = hub_family
    out = tmp_path / "m"
    proc = cli("-q", "merge", *fts, "--base", base, "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for repo in hub_family:
        snapshot_download(repo)  # (a merge by ID caches the shards; the rest of each snapshot too)
    proc = cli("verify", str(out), "--against", base, *fts, "--samples", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recomputed" in proc.stdout.lower() or "match" in proc.stdout.lower(), proc.stdout
    proc = cli("verify", str(out), "--against", base, *fts, env={"HF_HOME": str(tmp_path / "empty-home")})
    clean_error(proc, "not in the Hub cache", f"hf download {base}")


# ---- item 12: the Python API ------------------------------------------------------------------------------

def test_hub_access_error_carries_status_repo_id_and_reason(family, hub_user):
    import hf_metagpt

    base, fts = family
    with pytest.raises(hf_metagpt.HubAccessError) as info:
        hf_metagpt.plan(base=f"{hub_user}/no-such-repo-u12", models=[str(f) for f in fts])
    err = info.value
    assert (err.status, err.repo_id, err.reason) == (404, f"{hub_user}/no-such-repo-u12", "not_found")
    assert err.__cause__ is not None and type(err.__cause__).__name__ == "RepositoryNotFoundError"


def test_the_package_is_typed(tmp_path):
    import shutil
    import tomllib
    import zipfile

    assert (ROOT / "hf_metagpt" / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["hf_metagpt"]
    # and the wheel carries it (built from a copy: the build writes build/ and *.egg-info beside the sources)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "hf_metagpt", src / "hf_metagpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_metagpt-*.whl")
    assert "hf_metagpt/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_public_entry_points_type_their_keyword_arguments():
    import dataclasses
    import inspect as pyinspect
    import typing

    import hf_metagpt
    from hf_metagpt.options import MergeKwargs, MergeOptions

    from hf_metagpt.options import RECIPE_KEYS, InspectKwargs

    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    assert set(MergeKwargs.__annotations__) == fields | set(RECIPE_KEYS)
    for fn, typed in ((hf_metagpt.merge, "MergeKwargs"), (hf_metagpt.plan, "MergeKwargs"),
                      (hf_metagpt.inspect, "InspectKwargs")):
        params = pyinspect.signature(fn).parameters
        assert params["kwargs"].kind is pyinspect.Parameter.VAR_KEYWORD
        assert params["kwargs"].annotation is not typing.Any and typed in str(params["kwargs"].annotation), fn
        assert list(params)[0] == "options" and "base" not in params, fn  # base/models: keywords, as in merge
        assert "Args:" in fn.__doc__ and "Raises:" in fn.__doc__ and "Example:" in fn.__doc__, fn
    # inspect takes the inputs with merge's names and types, and only options that exist
    hints, merge_hints = typing.get_type_hints(InspectKwargs), typing.get_type_hints(MergeKwargs)
    assert set(hints) <= set(merge_hints)
    for name in ("base", "models", "recipe", "tokenizer_source", "token"):
        assert hints[name] == merge_hints[name], name
    assert "os.PathLike" in str(hints["base"]) and "os.PathLike" in str(hints["models"])


def test_inspect_takes_base_and_models_as_merge_and_plan_do(family, tmp_path):
    import yaml

    import hf_metagpt

    base, fts = family
    by_str = hf_metagpt.inspect(base=str(base), models=[str(f) for f in fts], progress=False, device="cpu")
    by_path = hf_metagpt.inspect(base=base, models=fts, progress=False, device="cpu")  # pathlib.Path
    opts = hf_metagpt.MergeOptions(base=base, models=fts, output=str(tmp_path / "unused"), method="ties",
                                   parameters={"density": 0.5}, device="cpu")
    by_options = hf_metagpt.inspect(opts, progress=False)  # the MergeOptions of a merge (its method not used)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "models": [str(f) for f in fts], "device": "cpu"}))
    by_recipe = hf_metagpt.inspect(recipe=recipe, progress=False)
    plan = hf_metagpt.plan(base=base, models=fts)
    assert [m.ref.display for m in plan.models] == list(by_str.geometry.models)
    for other in (by_path, by_options, by_recipe):
        assert other.geometry.models == by_str.geometry.models
        assert other.to_json()["model"] == by_str.to_json()["model"] and other.to_json()["groups"] == by_str.to_json()["groups"]
    assert not (tmp_path / "unused").exists()
    with pytest.raises(TypeError, match=r"base=\.\.\. and models=\[\.\.\.\], as for merge\(\) and plan\(\)"):
        hf_metagpt.inspect(str(base))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'method'"):
        hf_metagpt.inspect(base=base, models=fts, method="ties")  # type: ignore[call-arg]


# ---- the summary says what the method did: λ for MetaGPT's methods only -------------------------------

@pytest.mark.parametrize("method, params, expected", [
    ("ties", ["density=0.5", "weights=[0.3,0.7]"],
     ["| model | weights |", "| {0} | 0.3 |", "| {1} | 0.7 |", "TIES: {0}, {1} on {b}",
      "parameters: density=0.5, lambda=1, normalize=True, majority_sign_method=total, rescale=False"]),
    ("slerp", ["t=0.3"], ["SLERP: along the arc from {b} (t = 0) to {0} (t = 1), at t = 0.3", "parameters: t=0.3"]),
    ("model_stock", [], ["Model Stock: the average of 2 fine-tunes ({0}, {1}) pulled back toward {b} (the anchor)",
                         "parameters: filter_wise=False"]),
])
def test_summary_of_a_method_without_lambda_shows_what_it_did(family, tmp_path, method, params, expected):
    base, fts = family
    models = fts[:1] if method == "slerp" else fts
    args = [a for p in params for a in ("--param", p)]
    proc = cli("-q", "merge", *map(str, models), "--base", str(base), "-o", str(tmp_path / "m"), "--method", method,
               *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| group |" not in out and "λ" not in out and "granularity" not in out, out
    for line in expected:
        line = line.format(*(f.name for f in fts), b=base.name)
        assert line in out, (line, out)
    assert f"Merged {len(models)} model(s) into {base} with {method} -> " in out, out


def test_summary_of_metagpt_keeps_its_lambda_table(family, tmp_path):
    base, fts = family
    proc = cli("-q", "merge", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    lam = json.loads((tmp_path / "m" / "metagpt_coefficients.json").read_text())
    assert f"| group | {fts[0]} | {fts[1]} |" in proc.stdout, proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| model |"))
    assert [float(x) for x in row.strip("| ").split("|")[1:]] == pytest.approx(
        [round(x, 4) for x in _model_lambdas(lam)], abs=1e-4)
    assert "with metagpt (granularity model)" in proc.stdout


def _model_lambdas(coefficients: dict) -> list[float]:
    groups = coefficients.get("groups") or coefficients.get("coefficients")
    return groups["model"]["lambdas"] if isinstance(groups["model"], dict) else groups["model"]


def test_inspect_of_many_models_prints_a_table_of_fixed_width(tmp_path):
    from hf_metagpt.demo.tiny import build_family

    base, fts = build_family(tmp_path / "six", n_models=6)
    proc = cli("-q", "inspect", *map(str, fts), "--base", str(base), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "6 models, 15 pairs: a row per model" in proc.stdout
    assert max(len(line) for line in lines) < 120 + max(len(str(f)) for f in fts) * 2, max(lines, key=len)
    assert not any("cos 1·2" in line for line in lines)  # no column per pair
    for k, f in enumerate(fts, 1):
        assert any(line.startswith(f"[{k}]") and str(f) in line for line in lines), (k, proc.stdout)
    assert "the 10 pairs of largest |cos| over the whole model (of 15):" in proc.stdout
