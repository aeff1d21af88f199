"""Model references: what the user typed, and where the weights really are.

A reference is a local folder or a Hub ID (`org/name`, `org/name@revision`, or a canonical name
without namespace such as `gpt2`). Hub references are
pinned to a commit SHA by `hub.resolve` before anything is read, and every later read uses that
SHA; `local_path` is filled once the needed files are on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError

# Hub repo IDs: `namespace/name`, or a canonical name without namespace (`gpt2`,
# `bert-base-uncased`: the Hub answers them with a 307 to their current repo), in the characters the
# Hub allows (huggingface_hub's validate_repo_id is stricter about lengths; it runs again when the
# ID reaches the client).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*(?:/[\w.\-]+)?)(?:@(?P<rev>.+))?$")


@dataclass(frozen=True)
class ModelRef:
    """One input model: a local folder, or a Hub repo at a revision (pinned to `sha`)."""

    spec: str
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None
    local_path: Path | None = None
    #: a PEFT LoRA adapter rather than a full model (set when its folder is read; for the card's lineage)
    is_adapter: bool = False

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def display(self) -> str:
        """Short name for messages and tables."""
        if self.repo_id:
            return self.repo_id if not self.revision else f"{self.repo_id}@{self.revision}"
        return self.spec

    @property
    def pinned(self) -> str:
        """The reference as it reproduces exactly (`org/name@sha` or the local path)."""
        if self.repo_id:
            return f"{self.repo_id}@{self.sha}" if self.sha else self.display
        return self.spec

    def with_local_path(self, path: Path) -> "ModelRef":
        return replace(self, local_path=Path(path))


def parse_ref(spec: str | Path | ModelRef) -> ModelRef:
    """Turn what the user typed into a `ModelRef` (no network).

    An existing folder always wins over a Hub ID of the same spelling, like
    `from_pretrained` does.
    """
    if isinstance(spec, ModelRef):
        return spec
    text = str(spec).strip()
    if not text:
        raise InputError("Empty model reference.", hint="Give a local folder or a Hub ID like org/name.")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(spec=text, local_path=path.resolve())
    if path.exists():
        raise InputError(
            f"{text!r} is a file, not a model folder.",
            hint="Pass the folder that holds config.json and the *.safetensors files.",
        )
    m = _HUB_ID.match(text)
    # Slashes after '@' belong to the revision (`org/name@refs/pr/3`), not to a path.
    looks_local = text.startswith((".", "/", "~")) or text.split("@", 1)[0].count("/") > 1 or "\\" in text
    if m and not looks_local:
        return ModelRef(spec=text, repo_id=m.group("repo"), revision=m.group("rev"))
    hint = "Check the path, or use a Hub ID like org/name or org/name@revision."
    if nearby := closest_folder(text):
        hint = f"Did you mean {nearby!r}? " + hint
    raise InputError(f"Model {text!r} is neither an existing folder nor a Hub ID.", hint=hint)


def closest_folder(spec: str) -> str | None:
    """The existing sibling folder most like a missing local path (`models/chta` -> `models/chat`).

    None when the path's parent folder does not exist (then it is no mistyped local path) or
    nothing there is close.
    """
    import difflib

    path = Path(spec.rstrip("/\\")).expanduser()
    parent = path.parent
    if not path.name or not parent.is_dir():
        return None
    try:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir())
    except OSError:
        return None
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    if not match:
        return None
    return match[0] if str(parent) == "." else str(Path(spec.rstrip("/\\")).parent / match[0])


def local_folder_hint(ref_text: str) -> str:
    """For a Hub ID that failed: ' No local folder X exists either (closest: Y).' when X's parent
    folder exists here, so the ID was likely meant as a local path; '' otherwise."""
    spec = ref_text.split("@", 1)[0]
    if "/" not in spec:  # a canonical Hub name (`gpt2`) is spelled like a folder of the working directory
        nearby = closest_folder(spec)
        return (f" No local folder {spec!r} exists here either"
                + (f"; the closest is {nearby!r}." if nearby else "."))
    parent = Path(spec).expanduser().parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return ""
    nearby = closest_folder(spec)
    return (f" If {spec!r} was meant as a local folder: no such folder exists"
            + (f"; the closest is {nearby!r}." if nearby else "."))
