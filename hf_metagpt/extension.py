"""Register a pip-installed hf-metagpt with the `hf` CLI, offline.

`hf NAME ...` dispatches only through a manifest under huggingface_hub's extensions root (it never
searches $PATH), and `hf extensions install` can only fetch from GitHub. Writing that manifest with
huggingface_hub's own `ExtensionManifest`, pointing at the installed `hf-metagpt` script, makes
`hf metagpt ...` work without a network.
"""

from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import MergeError


def _script_path() -> Path:
    found = shutil.which("hf-metagpt")
    if found:
        return Path(found).resolve()
    candidate = Path(sys.executable).parent / "hf-metagpt"
    if candidate.exists():
        return candidate
    raise MergeError(
        "The `hf-metagpt` console script is not installed.",
        hint="Install the package with pip (pip install -e . or pip install hf-metagpt) first.",
    )


#: The manifest's source. `hf extensions update` (and the update hint) look `OWNER/REPO` up on GitHub
#: and install whatever they find there: the owner must be a name no GitHub account or organization
#: can take (those are alphanumerics and hyphens; a dot is refused), so an update can only come from
#: this installation (`pip install -U hf-metagpt`), never from a repository someone else registers.
SOURCE_OWNER = "pip.local"
SOURCE_REPO = "hf-metagpt"


def install_extension(force: bool = False) -> Path:
    """Write the `hf-metagpt` manifest so `hf metagpt` runs this installation; returns the script path."""
    try:
        from huggingface_hub.cli.extensions import (
            MANIFEST_FILENAME,
            ExtensionManifest,
            _get_extension_dir,
        )
    except ImportError as exc:  # older huggingface_hub without extensions
        raise MergeError(
            f"This huggingface_hub has no CLI extension support ({exc}).",
            hint="Upgrade huggingface_hub, or run `hf-metagpt` directly.",
        ) from None

    script = _script_path()
    ext_dir = _get_extension_dir("metagpt")
    manifest = ext_dir / MANIFEST_FILENAME
    if manifest.exists() and not force:
        current = ExtensionManifest.load(ext_dir)
        if Path(current.executable_path) == script and current.owner == SOURCE_OWNER:
            return script
    ExtensionManifest(
        owner=SOURCE_OWNER,
        repo=SOURCE_REPO,
        repo_id=f"{SOURCE_OWNER}/{SOURCE_REPO}",
        short_name="metagpt",
        executable_path=str(script),
        type="python",
        installed_at=datetime.now(timezone.utc),
        description="Merge fine-tuned LLMs with MetaGPT and publish them (pip-installed copy: update it with "
                    "pip install -U hf-metagpt; `hf extensions update` skips it).",
    ).save(ext_dir)
    return script
