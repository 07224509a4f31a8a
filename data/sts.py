"""Reader for the STS Benchmark (``sts-{train,dev,test}.csv``, tab-separated)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .io import iter_lines, resolve

STS_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")
MAX_SCORE = 5.0


@dataclass(frozen=True)
class ScoredPair:
    """Two texts and a similarity score.

    ``source`` is where the pair was read, ``"path:line"`` ("" when built in code), for
    messages about one pair; it takes no part in equality or hashing.
    """

    text1: str
    text2: str
    score: float
    source: str = field(default="", compare=False)


def load_sts(path: str | os.PathLike[str], split: str) -> list[ScoredPair]:
    """Load ``sts-{split}.csv`` (or ``.csv.gz``) from the STS Benchmark folder ``path``.

    Rows have the columns genre, file, year, id, score (0-5), sentence1, sentence2; extra
    trailing fields, which some rows carry, are ignored and blank lines are skipped. Raises
    DataError naming file, line and column for a malformed row, FileNotFoundError if the
    split's file does not exist.
    """
    file = resolve(path, f"sts-{split}.csv")
    lines = iter_lines(file)
    # QUOTE_NONE: quote characters in the sentences are literal text, not CSV quoting.
    rows = csv.reader((line for _, line in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    pairs: list[ScoredPair] = []
    try:
        for fields in rows:
            line_no = rows.line_num
            if not any(value.strip() for value in fields):
                continue
            pairs.append(_parse_row(fields, file, line_no))
    except csv.Error as err:
        raise DataError(f"malformed row: {err}", file, rows.line_num) from err
    if not pairs:
        raise DataError("no rows", file)
    return pairs


def _parse_row(fields: list[str], path: Path, line: int) -> ScoredPair:
    if len(fields) < len(STS_COLUMNS):
        reason = f"expected at least {len(STS_COLUMNS)} tab-separated fields, got {len(fields)}"
        raise DataError(reason, path, line)
    score_text, text1, text2 = fields[4:7]
    try:
        score = float(score_text)
    except ValueError:
        raise DataError(f"expected a number, got {score_text!r}", path, line, "score") from None
    # Written so that NaN fails too.
    if not 0.0 <= score <= MAX_SCORE:
        raise DataError(f"score {score_text} outside [0, {MAX_SCORE:g}]", path, line, "score")
    for column, text in (("sentence1", text1), ("sentence2", text2)):
        if not text.strip():
            raise DataError("empty text", path, line, column)
    return ScoredPair(text1, text2, score, source=f"{path}:{line}")
