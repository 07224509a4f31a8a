"""The single exception type raised when a data file fails validation."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data file failed validation.

    ``path`` is the file as given to the reader, ``line`` the 1-based line number and ``field``
    the offending field or column; ``line`` and ``field`` are None where they do not apply.
    ``str(err)`` reads like ``corpus.jsonl:17: field 'text': empty text``.
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike[str],
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        # Passing every argument to ValueError keeps the error picklable (e.g. across workers).
        super().__init__(reason, os.fspath(path), line, field)
        self.reason = reason
        self.path: str = os.fspath(path)
        self.line = line
        self.field = field

    def __str__(self) -> str:
        parts = [self.path if self.line is None else f"{self.path}:{self.line}"]
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason)
        return ": ".join(parts)
