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
