"""Recipes an attacker or a slip can write: alias bombs, endless files, names that are lists.

Each is refused quickly with one `error:` line naming the recipe and the fix, never a hang or a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_metagpt.errors import RecipeError
from hf_metagpt.options import MAX_RECIPE_BYTES, load_recipe, parse_recipe


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "-q", *args], capture_output=True, text=True,
                          timeout=timeout)


def _bomb_file(tmp_path: Path, levels: int, mergekit: bool) -> Path:
    """A parameter value whose each level lists the one before twice (an anchor, then its alias):
    2**levels numbers once expanded, in about 50 bytes per level."""
    chain = "&a0 [0.5, 0.5]"
    for i in range(1, levels + 1):
        chain = f"&a{i} [{chain}, *a{i - 1}]"
    if mergekit:
        text = ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n"
                f"      weight: {chain}\n      density: 0.5\n")
    else:
        text = f"base: base\nmodels: [a, b]\nmethod: linear\nparameters:\n  weights: {chain}\n"
    assert len(text) < 1500, len(text)
    path = tmp_path / ("bomb-mk.yaml" if mergekit else "bomb.yaml")
    path.write_text(text)
    return path


@pytest.mark.parametrize("mergekit", [False, True], ids=["hf-metagpt", "mergekit"])
def test_recipe_of_nested_aliases_is_refused_quickly(tmp_path, mergekit):
    path = _bomb_file(tmp_path, 25, mergekit)
    start = time.monotonic()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.monotonic() - start < 5
    assert "expands to more than 100000 values (nested YAML aliases?)" in err.value.message
    assert str(path) in err.value.message and "anchor" in err.value.hint


@pytest.mark.parametrize("command", ["plan", "merge"])
def test_recipe_of_nested_aliases_is_refused_by_the_cli_quickly(tmp_path, command):
    path = _bomb_file(tmp_path, 25, mergekit=False)
    extra = ["--output", str(tmp_path / "out")] if command == "merge" else []
    start = time.monotonic()
    proc = _cli(command, "--recipe", str(path), *extra, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "nested YAML aliases" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_with_a_few_aliases_still_reads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: b\nmodels: [m1, m2]\nmethod: linear\nparameters: {weights: &w [0.3, 0.7]}\n"
                    "x-note: *w\n")
    with pytest.raises(RecipeError, match="Unknown recipe key 'x-note'"):  # read past the alias check
        load_recipe(path)
    path.write_text("base: &b b\nmodels: [m1, *b]\nmethod: linear\n")
    assert load_recipe(path)["models"] == ["m1", "b"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_recipe_that_is_not_a_regular_file_is_refused(tmp_path, special):
    if special == "fifo":
        path = tmp_path / "pipe.yaml"
        os.mkfifo(path)  # opening it would wait for a writer forever
    elif special == "folder":
        path = tmp_path / "dir.yaml"
        path.mkdir()
    else:
        path = Path(special)
    start = time.monotonic()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.monotonic() - start < 5
    assert "is not a regular file" in err.value.message and str(path) in err.value.message


def test_recipe_dev_zero_is_refused_by_the_cli(tmp_path):
    proc = _cli("plan", "--recipe", "/dev/zero", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error: Recipe /dev/zero is not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_larger_than_the_cap_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * MAX_RECIPE_BYTES + "\nbase: b\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "is larger than 1 MiB" in err.value.message


@pytest.mark.parametrize("key,value", [("merge_method", "[ties, linear]"), ("merge_method", "{name: ties}"),
                                       ("dtype", "[bfloat16]"), ("out_dtype", "{a: 1}")])
def test_mergekit_method_or_dtype_that_is_not_a_name_is_refused(key, value):
    fields = {"merge_method": "ties", "dtype": "bfloat16"}
    fields[key] = value
    text = "\n".join(f"{k}: {v}" for k, v in fields.items())
    text += "\nbase_model: base\nmodels:\n  - model: base\n  - model: ft\n    parameters: {weight: 1, density: 0.5}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    kind = "method name" if key == "merge_method" else "dtype name"
    assert f"{key} must be a {kind}, got a " in err.value.message and "r.yaml, line " in err.value.message


def test_mergekit_method_as_a_list_is_refused_by_the_cli(tmp_path):
    path = tmp_path / "mk.yaml"
    path.write_text("merge_method: [ties]\nbase_model: base\nmodels:\n  - model: ft\n")
    proc = _cli("plan", "--recipe", str(path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "merge_method must be a method name, got a list" in proc.stderr and "Traceback" not in proc.stderr
