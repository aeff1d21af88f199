"""Shape checks for JSON and NDJSON bodies: a wrong type or a missing field is a 400 naming the field.

Without them a header sent as a list or `objects` sent as a string reached the endpoint code and
came back as a 500 with a traceback in the log.
"""

from __future__ import annotations

import json
from typing import Any

from .common import HubError, printable

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "a list", dict: "an object"}


def parse_json(raw: bytes | str, what: str) -> Any:
    """`raw` parsed as JSON; else 400 (invalid text, or nested too deeply for the parser: `[[[[…`)."""
    try:
        return json.loads(raw)
    except ValueError:
        raise HubError(400, f"{what} is not valid JSON") from None
    except RecursionError:
        raise HubError(400, f"{what} is nested too deeply") from None


def as_object(value: Any, what: str) -> dict:
    """`value` if it is a JSON object; else 400."""
    if not isinstance(value, dict):
        raise HubError(400, f"{what} must be a JSON object")
    return value


def field(obj: dict, key: str, kind: type, what: str, *, required: bool = False, default: Any = None,
          max_len: int | None = None) -> Any:
    """``obj[key]`` checked to be of `kind` (``null`` counts as absent), at most `max_len` long.

    Raises a 400 `HubError` naming `what` and the key when the value has another type, is missing
    while `required`, or is too long.
    """
    value = obj.get(key)
    if value is None:
        if required:
            raise HubError(400, f"{what}: '{printable(key)}' is required")
        return default
    # bool is an int in Python, never in JSON schemas
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HubError(400, f"{what}: '{printable(key)}' must be {_TYPE_NAMES[kind]}")
    if max_len is not None and len(value) > max_len:
        raise HubError(413 if kind is list else 400,
                       f"{what}: '{printable(key)}' is too long (at most {max_len})")
    return value


def size_field(obj: dict, key: str, what: str, *, required: bool = True) -> int | None:
    """A non-negative integer size."""
    value = field(obj, key, int, what, required=required)
    if value is not None and value < 0:
        raise HubError(400, f"{what}: '{printable(key)}' must not be negative")
    return value


def objects(values: list, what: str) -> list[dict]:
    """Every item of a list checked to be a JSON object."""
    for i, item in enumerate(values):
        as_object(item, f"{what}[{i}]")
    return values
