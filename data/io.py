"""File helpers shared by the readers: gzip-transparent opening, lookup, lines and JSONL;
and the dotted keys that progress records store settings under."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from biencoder.runtime.files import atomic_write

from .errors import DataError
from .fields import describe


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


def dotted_leaves(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``node``'s values by dotted key (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), so that a
    refused resumption names the leaf that changed (``teacher.path``), not its node."""
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            leaves.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


# ------------------------------------------------------------------ progress records
# mine.py and synthesize.py append to an output file in batches (runtime.files.append_durably)
# and record after each how far it is written; a resumed run cuts the file back to the record
# and continues.


def progress_path(out: Path) -> Path:
    """Where the progress of writing ``out`` is recorded: ``<out>.progress.json``."""
    return out.with_name(out.name + ".progress.json")


def read_progress(
    out: Path, resume: bool, settings: dict[str, Any], fresh: dict[str, Any], unit: str
) -> dict[str, Any]:
    """The progress record to continue ``out`` from when ``resume``, else ``fresh`` (with
    ``settings``). Raises ValueError, naming ``out`` or ``resume``, where it would refuse:
    ``out`` exists without ``resume``, has no record (so which ``unit`` it holds is
    unknown), its record is not one (see :func:`load_progress`), or was written with other
    ``settings`` (each changed key is named). Cheap: call it before loading anything."""
    record = progress_path(out)
    fresh = {"settings": settings, **fresh}
    if not resume:
        if out.exists():
            raise ValueError(f"out: {out} exists; resume=true continues it, or delete it")
        return fresh
    if not record.exists():
        if out.exists():
            raise ValueError(
                f"resume: {out} has no {record.name} beside it, so which {unit} it holds is "
                "unknown; delete it to start again"
            )
        return fresh
    progress = load_progress(out, fresh)
    before = progress["settings"]
    changed = [
        f"{key}={before.get(key)!r}, now {settings.get(key)!r}"
        for key in dict.fromkeys([*before, *settings])
        if before.get(key) != settings.get(key)
    ]
    if changed:
        raise ValueError(f"resume: {out} was written with " + "; ".join(changed))
    return progress


def load_progress(out: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The progress record of ``out``, checked to hold every key of ``fresh`` with a value of
    its JSON type (counts as non-negative integers). Raises ValueError naming ``resume``, the
    record's path and what is wrong with it: invalid JSON (with its line and column), a
    missing key or a value of another type."""
    record = progress_path(out)
    advice = f"delete it and {out} to start over, or restore it from a copy"
    try:
        progress = json.loads(record.read_bytes())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"resume: {record}: invalid JSON at line {err.lineno}, column {err.colno} "
            f"({err.msg}); {advice}"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"resume: {record}: not UTF-8 text (byte {err.start + 1}); {advice}"
        ) from err
    if not isinstance(progress, dict):
        raise ValueError(
            f"resume: {record}: expected a JSON object, got {describe(progress)}; {advice}"
        )
    for key, default in fresh.items():
        if key not in progress:
            raise ValueError(f"resume: {record}: missing key {key!r}; {advice}")
        if not _same_kind(progress[key], default):
            raise ValueError(
                f"resume: {record}: key {key!r} is {describe(progress[key])}, expected "
                f"{_KINDS.get(type(default), type(default).__name__)}; {advice}"
            )
    return progress


_KINDS = {bool: "true or false", int: "a non-negative integer", list: "an array", dict: "an object"}


def _same_kind(value: Any, default: Any) -> bool:
    # JSON true is a Python int too, so a count is checked to be no bool.
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int):
        return isinstance(value, int) and value >= 0
    return isinstance(value, type(default))


def save_progress(out: Path, progress: dict[str, Any]) -> None:
    """Record ``progress`` for ``out``, atomically (:func:`runtime.files.atomic_write`: written
    aside, pushed to disk, then renamed); an OSError (a full disk) names the record."""
    record = progress_path(out)
    with naming_errors(record, "the progress record"):
        atomic_write(record, json.dumps(progress, indent=1) + "\n")


@contextlib.contextmanager
def naming_errors(path: Path, what: str) -> Iterator[None]:
    """Re-raise an OSError from the block as one naming ``what`` is written and ``path``:
    a failed write or fsync names no file (a full disk says only "No space left on
    device"), and one that names the hidden file written aside misleads."""
    try:
        yield
    except OSError as err:
        message = f"cannot write {what} {path}: {err.strerror or err}"
        if err.errno is None:
            raise OSError(message) from err
        # OSError() picks the subclass of the errno (EACCES: PermissionError) again.
        raise OSError(err.errno, message) from err
