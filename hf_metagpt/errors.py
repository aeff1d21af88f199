"""Exceptions that end a merge with one clear message.

Every error a user can cause is a `MergeError`: the CLI prints its message and hint and exits 2
without a traceback (unless `--debug`); the Python API raises it, with the fix in `hint` (worded
for both: `--output DIR (output=...)`). All are importable from `hf_metagpt`. Anything else is a
bug and is shown as one.
"""

from __future__ import annotations


class MergeError(Exception):
    """A problem with the inputs or options; `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(MergeError):
    """A model reference, file or tensor cannot be used as given."""


class IncompatibleModelsError(MergeError):
    """The base and fine-tunes do not line up (architecture, config, names, shapes)."""


class OutputError(MergeError):
    """The output location cannot be written safely."""


class RecipeError(MergeError):
    """A YAML recipe has an unknown key or a value of the wrong type."""


class NonFiniteError(MergeError):
    """An input tensor holds NaN or Inf."""


class IntegrityError(MergeError):
    """A merged folder fails `hf-metagpt verify`: missing, damaged or inconsistent files."""


class UnsupportedAdapterError(InputError):
    """A PEFT adapter hf-metagpt cannot turn into an exact task vector."""


class UnsafePickleError(InputError):
    """A pickle file asks to run code (or build objects) that weights-only loading does not allow."""


class TaskSpecError(InputError):
    """A `--task NAME=DATASET[:split][:field]` spec cannot be used."""


class HubAccessError(MergeError):
    """A Hub repo or revision cannot be read (missing, private, gated) or written.

    `repo_id` (the repo asked for), `status` (the Hub's HTTP status, None without an answer) and
    `reason` ("not_found", "gated", "unauthorized", "forbidden", "revision_not_found", "entry_not_found",
    "unavailable", ...) tell the cases apart without parsing the message; the huggingface_hub error
    it came from is kept as `__cause__`.
    """

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None,
                 repo_id: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.repo_id = repo_id
        self.reason = reason


class HubUnavailableError(HubAccessError):
    """The Hub kept failing (5xx, timeouts, dropped connections) after every retry."""


class DownloadStopped(MergeError):
    """A background download was abandoned because its provider was closed (the merge ended)."""


class MainProcessStopped(MergeError):
    """The main process of a shared merge failed before the merge (it prints the reason; the others only stop)."""
