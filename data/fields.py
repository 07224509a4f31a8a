"""Typed access to fields of decoded JSON records, raising DataError naming file:line:field."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .errors import DataError

PathArg = str | os.PathLike[str]


def describe(value: object) -> str:
    """Name a decoded JSON value for an error message: its type, or its text if it is short."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check_text(
    value: object,
    path: PathArg,
    line: int,
    field: str,
    *,
    allow_empty: bool = False,
    what: str = "text",
) -> str:
    """Return ``value`` if it is a string (non-blank unless ``allow_empty``)."""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {describe(value)}", path, line, field)
    if not allow_empty and not value.strip():
        raise DataError(f"empty {what}", path, line, field)
    return value


def text_field(
    record: dict[str, Any],
    key: str,
    path: PathArg,
    line: int,
    *,
    default: str | None = None,
    allow_empty: bool = False,
    what: str = "text",
) -> str:
    """Return the string ``record[key]``; a missing key is an error unless ``default`` is set."""
    if key not in record:
        if default is not None:
            return default
        raise DataError("required field is missing", path, line, key)
    return check_text(record[key], path, line, key, allow_empty=allow_empty, what=what)


def number_field(record: dict[str, Any], key: str, path: PathArg, line: int) -> float:
    """Return the finite number ``record[key]`` as a float."""
    if key not in record:
        raise DataError("required field is missing", path, line, key)
    return check_number(record[key], path, line, key)


def check_number(value: object, path: PathArg, line: int, field: str) -> float:
    """Return ``value`` as a float if it is a finite number."""
    # bool is an int subclass in Python, but `true` is not a score.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {describe(value)}", path, line, field)
    if not math.isfinite(value):
        raise DataError(f"expected a finite number, got {describe(value)}", path, line, field)
    return float(value)
