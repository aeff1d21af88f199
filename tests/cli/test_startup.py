"""Start-up cost: importing the package and `--version` / `--help` need no torch (fresh interpreters)."""
import subprocess
import sys

import hf_metagpt


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines()[-1].split())


def test_importing_the_package_and_the_cli_imports_no_torch():
    mods = _modules_after("import hf_metagpt, hf_metagpt.cli, hf_metagpt.options")
    assert "hf_metagpt.cli" in mods and "hf_metagpt.options" in mods
    assert "torch" not in mods and "huggingface_hub" not in mods


def test_the_entry_points_are_the_functions_when_first_used():
    import hf_metagpt.api
    import hf_metagpt.inspect_api

    assert hf_metagpt.merge is hf_metagpt.api.merge and hf_metagpt.plan is hf_metagpt.api.plan
    assert hf_metagpt.inspect is hf_metagpt.inspect_api.inspect
    assert set(hf_metagpt.__all__) <= set(dir(hf_metagpt))
    for name in hf_metagpt.__all__:
        assert getattr(hf_metagpt, name) is not None
    try:
        hf_metagpt.not_a_name
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_version_runs_without_importing_torch_and_merge_help_still_lists_the_methods():
    code = ("import sys, runpy\nsys.argv = ['hf-metagpt', '--version']\n"
            "try:\n    runpy.run_module('hf_metagpt', run_name='__main__')\nexcept SystemExit:\n    pass\n")
    mods = _modules_after(code)
    assert "torch" not in mods
    out = subprocess.run([sys.executable, "-m", "hf_metagpt", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"hf-metagpt {hf_metagpt.__version__}"
    help_text = subprocess.run([sys.executable, "-m", "hf_metagpt", "merge", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "methods (--method NAME" in help_text
    for name in ("metagpt", "ties", "slerp", "karcher", "arcee_fusion"):
        assert f"\n  {name} " in help_text


def test_options_a_merge_cannot_run_with_are_refused_before_torch_is_imported(tmp_path):
    # each: the command line, and a piece of the refusal it must print
    cases = [(["merge", "--base", "a", "b"], "--output"),
             (["merge", "--base", "a", "b", "-o", str(tmp_path / "o"), "--push-to", "my model"], "ORG/NAME"),
             (["merge", "--base", "a", "b", "-o", str(tmp_path / "o"), "--push-to", "me/x", "--create-pr",
               "--revision", "dev"], "--create-pr"),
             (["plan", "--recipe", str(tmp_path / "missing.yml")], "missing.yml"),
             (["push", str(tmp_path), "my model"], "ORG/NAME")]
    for argv, expected in cases:
        # the modules are printed by an atexit handler: the CLI's exit (`cli.exit_now`) runs them
        code = ("import sys, runpy, atexit\n"
                "atexit.register(lambda: print(' '.join(sorted(sys.modules))))\n"
                "sys.argv = ['hf-metagpt'] + " + repr(argv) + "\n"
                "runpy.run_module('hf_metagpt', run_name='__main__')\n")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        lines = run.stdout.splitlines()
        assert run.returncode == 2, (argv, run.stdout, run.stderr)
        assert expected in run.stderr and "Traceback" not in run.stderr, (argv, run.stderr)
        assert "torch" not in lines[-1].split(), argv
