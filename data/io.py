"""File helpers shared by the readers: gzip-transparent opening, lookup, lines and JSONL."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ._fields import describe
from .errors import DataError


def _is_gzip(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(".gz")


def open_text(path: str | os.PathLike[str]) -> TextIO:
    """Open a plain or gzip-compressed (``.gz``) file for reading as UTF-8 text."""
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def resolve(folder: str | os.PathLike[str], name: str) -> Path:
    """Return the path of ``name`` or, failing that, ``name + ".gz"`` in ``folder``.

    Raises FileNotFoundError naming both candidates if neither exists.
    """
    candidates = (Path(folder) / name, Path(folder) / f"{name}.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {candidates[0]} nor {candidates[1]} exists")


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """Yield ``(line_no, line)`` for every line of a plain or ``.gz`` UTF-8 file.

    Line numbers are 1-based and line endings are stripped. Invalid UTF-8 and corrupt gzip
    data raise DataError.
    """
    line_no = 0
    with _open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                # Decoding each line ourselves, rather than through a text wrapper that decodes
                # in chunks, keeps the line number of a decoding error exact.
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    reason = f"invalid UTF-8 at byte {err.start + 1} of the line"
                    raise DataError(reason, path, line_no) from err
                yield line_no, text.rstrip("\r\n")
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise DataError(f"corrupt gzip data after line {line_no}: {err}", path) from err


def _open_binary(path: str | os.PathLike[str]) -> BinaryIO | gzip.GzipFile:
    if _is_gzip(path):
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, record)`` for each non-blank line of a JSONL file (plain or ``.gz``).

    Line numbers are 1-based and count blank lines. Malformed JSON and lines that are not
    JSON objects raise DataError naming the file and line.
    """
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            reason = f"malformed JSON: {err.msg} (column {err.colno})"
            raise DataError(reason, path, line_no) from err
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {describe(record)}", path, line_no)
        yield line_no, record
