"""Model references: what the user typed, and where the weights really are.

A reference is a local folder or a Hub ID (`org/name` or `org/name@revision`). Hub references are
pinned to a commit SHA by `hub.resolve` before anything is read, and every later read uses that
SHA; `local_path` is filled once the needed files are on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError

# Hub repo IDs: one namespace, one name, the characters the Hub allows (huggingface_hub's
# validate_repo_id is stricter about lengths; it runs again when the ID reaches the client).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>.+))?$")


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
    raise InputError(
        f"Model {text!r} is neither an existing folder nor a Hub ID.",
        hint="Check the path, or use a Hub ID like org/name or org/name@revision.",
    )
