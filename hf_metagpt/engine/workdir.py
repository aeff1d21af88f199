"""The output folder: checks before anything runs, a work folder beside it, an atomic swap at the end.

A merge writes into `.NAME.hf-metagpt-partial/` next to the target and renames it into place only
when every file is written, so an interrupted run never leaves a folder that looks complete. The
work folder is keyed by the plan: a rerun of the same merge resumes from its finished shards.
While a merge runs, `.NAME.hf-metagpt-lock` beside the target is locked (`lock_output`): a second
merge into the same output stops at once, naming the process that holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, OutputError
from ..dtype_names import ST_TO_CONFIG
from ..sources.local import INDEX_FILE, TOKENIZER_FILES, side_file
from ..sources.model import ModelInfo
from .ledger import PROGRESS_FILES, digest, valid_norms, write_json_atomic
from .plan import MergePlan

log = logging.getLogger(__name__)

PLAN_KEY_FILE = "hf_metagpt_plan.json"


@dataclass
class OutputDirs:
    target: Path
    work: Path
    resumed: bool = False
    #: the output may replace a finished merge already there (`--overwrite`); rechecked at publish
    overwrite: bool = False


#: the recipe that reproduces a merge, written beside its weights
RECIPE_FILE = "hf_metagpt_recipe.yaml"
#: What a merge writes into its output folder (a folder holding anything else is never replaced).
MERGE_FILES = frozenset({
    "config.json", "generation_config.json", INDEX_FILE, "README.md", RECIPE_FILE,
    "adapter_config.json", "compare.png", ".gitattributes", *TOKENIZER_FILES,
})
MERGE_PATTERNS = ("*.safetensors", "metagpt_*", "hf_metagpt_*", "lora_*.json")


def foreign_entries(target: Path) -> list[str]:
    """Entries of an existing output folder that no merge writes (a `.git`, a subfolder, notes...)."""
    from fnmatch import fnmatchcase

    out = []
    for entry in sorted(target.iterdir()):
        ours = entry.name in MERGE_FILES or any(fnmatchcase(entry.name, p) for p in MERGE_PATTERNS)
        if not ours or entry.is_symlink() or not entry.is_file():
            out.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return out


def check_replaceable(target: Path, overwrite: bool, *, at_publish: bool = False) -> None:
    """An existing output is replaced only when empty, or with `overwrite` when it holds nothing but
    what a merge writes: `--overwrite` never deletes a project, a git checkout or someone's notes."""
    if not target.is_dir() or not any(target.iterdir()):
        return
    when = " (it was filled while the merge ran)" if at_publish else ""
    if not overwrite:
        raise OutputError(f"The output folder {target} is not empty{when}.",
                          hint="Pass --overwrite (overwrite=True) to replace it, or choose another folder.")
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"The output folder {target} holds {shown}, which a merge does not write{when}: "
                          f"--overwrite replaces only a folder that holds a merge's files.",
                          hint="Choose another output folder, or move those entries away (or delete the folder "
                               "yourself) and run again.")


def check_output(target: Path, inputs: Sequence[ModelInfo], overwrite: bool) -> None:
    """Refuse outputs that would lose data or fail at the end: non-empty without --overwrite,
    overlapping an input, a mount point (it cannot be swapped), or a parent we cannot write."""
    target = target.expanduser().resolve()
    for info in inputs:
        src = info.ref.local_path
        if src is None:
            continue
        src = src.resolve()
        if target == src or src in target.parents:
            raise OutputError(f"The output folder {target} is inside the input model {info.name}.",
                              hint="Choose an output folder outside every input folder.")
        if target in src.parents:
            raise OutputError(f"The input model {info.name} is inside the output folder {target}.",
                              hint="Choose an output folder that does not contain the inputs.")
    if target.exists() and not target.is_dir():
        raise OutputError(f"The output {target} exists and is a file.", hint="Choose a folder path.")
    check_replaceable(target, overwrite)
    if os.path.ismount(target):
        raise OutputError(f"The output {target} is a mount point: the finished merge could not be renamed onto it.",
                          hint=f"Write into a folder inside it, e.g. {target / 'merged'}.")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write beside the output: {parent} is not writable.",
                          hint="Choose an output folder in a place you can write to.")


def fingerprint(info: ModelInfo) -> list[Any]:
    """Identity of an input: its commit SHA on the Hub, else each weight file's size and mtime."""
    if info.ref.sha:
        return [info.ref.repo_id, info.ref.sha]
    out: list[Any] = [str(info.ref.local_path)]
    for f in info.weight_files:
        st = (info.files_dir / f).stat()  # type: ignore[operator]
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ledger_key(plan: MergePlan, method_name: str, params: dict[str, Any], seed: int | None, *,
               allow_nonfinite: bool, device_type: str) -> str:
    """What the squared norms depend on: every input (commit SHA, or each weight file's identity),
    the method and its parameters, the seed, the granularity used, the tokenizer source,
    `allow_nonfinite` (NaN treated as unchanged) and, for seeded methods, the device type (CPU and
    CUDA generators draw different DARE masks). Local files are identified by path, size and
    modification time, not by a hash of their bytes: hashing every input would read it once more."""
    key = {"inputs": [fingerprint(i) for i in plan.inputs], "method": method_name,
           "params": params, "seed": seed, "granularity": plan.granularity,
           "tokenizer_source": plan.tokenizer_source, "allow_nonfinite": allow_nonfinite,
           "device": device_type if seed is not None else None}
    if plan.options.layers is not None:  # which input layers feed which output layers (mergekit slices)
        key["layers"] = plan.options.layers
    return _digest(key)


def plan_key(plan: MergePlan, nkey: str) -> str:
    """What the output bytes depend on: the norms' key plus the output layout."""
    layout = [[s.file, [[t.name, t.out_dtype, list(t.out_shape)] for t in s.tensors]] for s in plan.shards]
    return _digest({"norms": nkey, "layout": layout})


def work_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.hf-metagpt-partial"


def lock_file_for(target: Path) -> Path:
    return target.parent / f".{target.name}.hf-metagpt-lock"


class OutputLock:
    """An exclusive lock on one output (and so its work folder) for the length of a merge.

    `fcntl.flock` on `.NAME.hf-metagpt-lock` where there is one: the kernel drops it when the
    process ends, so a crashed or killed merge never leaves a lock that holds. The file is removed
    on release; a run that locked a file another run removed meanwhile locks the new one instead
    (the inode check below). Elsewhere a lock file created exclusively stands in. The holder's
    process id is written in the file for the message a second merge prints.
    """

    def __init__(self, target: Path) -> None:
        self.target = target.expanduser().resolve()
        self.path = lock_file_for(self.target)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._lock()
        except (BlockingIOError, FileExistsError):
            raise OutputError(f"Another merge ({self._holder()}) is writing {self.target} now.",
                              hint="Wait for it to finish (a second run then resumes or reuses it), "
                                   "or choose another output folder.") from None
        except OSError as exc:  # a read-only or missing parent, a path that cannot be a folder
            raise OutputError(f"Cannot write beside the output {self.target}: {exc.strerror or exc}.",
                              hint="Choose an output folder in a place you can write to.") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def _lock(self) -> int:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): an exclusively created file
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.stat(self.path)
            except BaseException:
                os.close(fd)
                if isinstance(sys.exc_info()[1], FileNotFoundError):
                    continue  # removed by its holder between our open and our lock: take a new one
                raise
            if os.fstat(fd).st_ino == st.st_ino:
                return fd
            os.close(fd)  # we locked a file its holder had just removed

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
            return f"process {pid}" if pid else "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: nobody can be holding the next one yet
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare(target: Path, key: str, *, overwrite: bool = False) -> OutputDirs:
    """Create (or resume) the work folder for this plan (the caller holds the output's lock)."""
    target = target.expanduser().resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the output's parent folder {target.parent}: {exc.strerror}.",
                          hint="Choose an output folder in a place you can write to.") from None
    work = work_dir_for(target)
    key_file = work / PLAN_KEY_FILE
    if work.is_dir():
        try:
            same = json.loads(key_file.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if same:
            log.info("Resuming an interrupted merge from %s", work)
            return OutputDirs(target, work, resumed=True, overwrite=overwrite)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    key_file.write_text(json.dumps({"key": key}))
    return OutputDirs(target, work, overwrite=overwrite)


def write_side_files(plan: MergePlan, work: Path) -> None:
    """Index, config, generation config and tokenizer files next to the shards."""
    weight_map = {t.name: plan.shards[t.shard].file for t in plan.tensors}
    index = {"metadata": {"total_size": plan.bytes_to_write}, "weight_map": weight_map}
    (work / INDEX_FILE).write_text(json.dumps(index, indent=2))

    config = dict(plan.base.config)
    dtype = ST_TO_CONFIG.get(plan.out_dtype, "float32")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    for t in plan.tensors:
        if t.name.endswith("embed_tokens.weight"):
            config["vocab_size"] = t.out_shape[0]
    (work / "config.json").write_text(json.dumps(config, indent=2))
    for name, src in remote_code(plan):  # the config's auto_map still names them: the merge loads with them
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, work / name)

    gen = _generation_config(plan)
    if gen is not None:  # the bytes that were checked, as the base has them
        (work / "generation_config.json").write_bytes(gen)
    else:
        _default_generation_config(config, work)

    copied = []
    for name, src in tokenizer_files(plan):
        shutil.copyfile(src, work / name)
        copied.append(name)
    if not copied:
        log.warning("No tokenizer files found in %s; the output has no tokenizer.",
                    plan.inputs[plan.tokenizer_source].name)
    elif plan.chat_template is not None:
        from ..sources.chat_template import write_template

        write_template(work, plan.chat_template)


def tokenizer_files(plan: MergePlan) -> list[tuple[str, Path]]:
    """The tokenizer source's tokenizer files (name, path); a link out of its folder is refused."""
    info = plan.inputs[plan.tokenizer_source]
    folder = info.ref.local_path
    if folder is None:
        return []
    return [(name, p) for name in TOKENIZER_FILES if (p := side_file(folder, name, info.name)) is not None]


def _generation_config(plan: MergePlan) -> bytes | None:
    """The base's generation_config.json (None when it has none), once it parses as a JSON object."""
    folder = plan.base.ref.local_path
    path = side_file(folder, "generation_config.json", plan.base.name) if folder is not None else None
    if path is None:
        return None
    raw = path.read_bytes()
    try:
        gen = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{plan.base.name}: generation_config.json is not valid JSON ({exc}).",
                         hint="Fix or remove the base's generation_config.json.") from None
    if not isinstance(gen, dict):
        raise InputError(f"{plan.base.name}: generation_config.json holds a {type(gen).__name__}, not a JSON object.",
                         hint="Fix or remove the base's generation_config.json.")
    return raw


def check_side_files(plan: MergePlan) -> None:
    """Before any weight is read: the side files a merge will copy are inside their models and parse."""
    tokenizer_files(plan)
    _generation_config(plan)
    remote_code(plan)


def remote_code(plan: MergePlan) -> list[tuple[str, Path]]:
    """The base's custom code (`modeling_*.py`, ...) its config's `auto_map` names: copied with the config
    (which keeps the auto_map), so `from_pretrained(..., trust_remote_code=True)` loads the merge. One
    the base lacks is refused: the output would name code it does not hold."""
    from ..sources.hub import remote_code_files

    folder = plan.base.ref.local_path
    out = []
    for name in remote_code_files(plan.base.config):
        path = side_file(folder, name, plan.base.name) if folder is not None else None
        if path is None:
            raise InputError(f"{plan.base.name}: config.json's auto_map names {name}, which the base does not hold; "
                             f"the merge would need it to load (trust_remote_code).",
                             hint="Use a base whose repo holds its custom code, or remove auto_map from its config.json "
                                  "if the architecture is one transformers has.")
        out.append((name, path))
    return out


def _default_generation_config(config: dict[str, Any], work: Path) -> None:
    from transformers import GenerationConfig

    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    GenerationConfig(**{k: config[k] for k in keys if config.get(k) is not None}).save_pretrained(work)


def publish(dirs: OutputDirs, norms: dict[str, Any] | None = None) -> Path:
    """Swap the finished work folder into place (the old output is removed only after).

    The output is checked again first: whatever appeared in it while the merge ran (a file, another
    merge's output) is never deleted; the finished merge then stays in the work folder. `norms`:
    the ledger's state (`NormLedger.state`), kept in the Hub cache home for a rerun (`cached_norms`).
    """
    target, work = dirs.target, dirs.work
    try:
        check_replaceable(target, dirs.overwrite, at_publish=True)
    except OutputError as exc:
        raise OutputError(exc.message, hint=f"{exc.hint} The finished merge is kept in {work}: a rerun into the "
                                            f"same output resumes from it.") from None
    if target.exists() and not target.is_dir():
        raise OutputError(f"The output {target} appeared as a file while the merge ran; it was left alone.",
                          hint=f"Remove it and run again (the finished merge in {work} is reused).")
    (work / PLAN_KEY_FILE).unlink(missing_ok=True)
    for leftover in [*work.glob(PROGRESS_FILES), *work.glob("*.tmp")]:
        leftover.unlink()
    old = None
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            old = target.parent / f".{target.name}.hf-metagpt-old"
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if norms is not None:
        keep_norms(target, norms)
    return target


#: finished merges whose ledgers are kept (the oldest beyond this are removed)
KEPT_LEDGERS = 32


def norms_file_for(target: Path, key: str) -> Path:
    """Where a finished merge keeps its ledger: in this user's Hub cache home, by output folder and norms'
    key, never in the output (a folder downloaded from the Hub, or pushed to it, never carries one)."""
    from huggingface_hub import constants

    name = digest([str(target.expanduser().resolve()), key])
    return Path(constants.HF_HOME) / "hf-metagpt" / "norms" / f"{name}.json"


def keep_norms(target: Path, norms: dict[str, Any]) -> None:
    """Keep a finished merge's ledger (`NormLedger.state`) with its checksum for reruns (`cached_norms`)."""
    path = norms_file_for(target, str(norms.get("key")))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**norms, "sha256": digest(norms)})
        kept = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for stale in kept[KEPT_LEDGERS:]:
            stale.unlink(missing_ok=True)
    except OSError as exc:  # only a rerun's pass 1 depends on it
        log.warning("Could not keep the squared norms for a rerun (%s): a rerun computes them again.", exc)


def _saved_ledger(target: Path, key: str) -> dict[str, Any] | None:
    """The ledger a finished merge of this key into `target` kept, when intact (sha256, key) and the
    output is still there."""
    path = norms_file_for(target, key)
    if not target.is_dir():
        return None
    try:
        data = json.loads(path.read_text())
        claimed = data.pop("sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        log.warning("Ignoring the squared norms kept in %s (unreadable): pass 1 runs again.", path)
        return None
    if claimed != digest(data):
        log.warning("Ignoring the squared norms kept in %s (their checksum does not match): pass 1 runs again.", path)
        return None
    return data if data.get("key") == key else None


def cached_grams(target: Path, key: str) -> list[tuple[str, list[list[float]]]]:
    """The per-tensor Gram matrices a finished merge of the same inputs into `target` kept (empty if none)."""
    data = _saved_ledger(target, key)
    if data is None:
        return []
    try:
        return [(str(t), [[float(x) for x in row] for row in g]) for _, t, g in data.get("grams", [])]
    except (ValueError, TypeError):
        return []


def cached_norms(target: Path, key: str) -> dict[str, list[float]] | None:
    """Squared norms a finished merge of the same inputs into `target` kept (a rerun or push retry skips pass 1).

    Only this tool's own ledger counts, never a folder's metagpt_coefficients.json (whoever published
    that chose its numbers: the key of Hub inputs is predictable); negative or non-finite norms are refused."""
    data = _saved_ledger(target, key)
    if data is None:
        return None
    try:
        sq = {str(g): [float(x) for x in v] for g, v in data["sq_norms"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not valid_norms(sq):
        log.warning("Ignoring the squared norms kept in %s (negative or not finite): pass 1 runs again.",
                    norms_file_for(target, key))
        return None
    return sq
