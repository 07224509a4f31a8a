"""Readers for training files (JSONL, plain or ``.gz``), and training pairs from BEIR qrels.

Every reader validates each record and raises DataError naming file, line and field; an empty
file is an error too. Fields other than the ones a reader uses are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .beir import BeirDataset
from .errors import DataError
from .fields import PathArg, check_number, check_text, describe, number_field, text_field
from .io import iter_jsonl
from .sts import ScoredPair

T = TypeVar("T")


@dataclass(frozen=True)
class Pair:
    """A query and a relevant (positive) text."""

    query: str
    positive: str


@dataclass(frozen=True)
class Triplet:
    """A query, a positive text and one or more negative texts.

    ``scores`` are optional teacher scores of (query, positive) then (query, negative_k)
    for each negative, which distillation losses learn from; ``source`` is where the
    example was read (``path:line``) for error messages.
    """

    query: str
    positive: str
    negatives: tuple[str, ...]
    scores: tuple[float, ...] | None = None
    source: str = field(default="", compare=False)


# A training example: what training sets yield and tasks batch.
Example = Pair | Triplet | ScoredPair


@dataclass(frozen=True)
class LabelledText:
    """A text and its class label."""

    text: str
    label: int | str


def _load(path: PathArg, parse: Callable[[dict[str, Any], PathArg, int], T]) -> list[T]:
    items = [parse(record, path, line_no) for line_no, record in iter_jsonl(path)]
    if not items:
        raise DataError("no records", path)
    return items


def _parse_pair(record: dict[str, Any], path: PathArg, line: int) -> Pair:
    return Pair(text_field(record, "query", path, line), text_field(record, "positive", path, line))


def load_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Load ``{"query": str, "positive": str}`` records."""
    return _load(path, _parse_pair)


def _parse_negatives(record: dict[str, Any], path: PathArg, line: int) -> tuple[str, ...]:
    if "negative" in record:
        if "negatives" in record:
            raise DataError("give 'negatives' or 'negative', not both", path, line, "negative")
        return (text_field(record, "negative", path, line),)
    if "negatives" not in record:
        raise DataError(
            "required field is missing (or give one 'negative')", path, line, "negatives"
        )
    negatives = record["negatives"]
    if not isinstance(negatives, list):
        reason = f"expected an array of strings, got {describe(negatives)}"
        raise DataError(reason, path, line, "negatives")
    if not negatives:
        raise DataError("needs at least one negative", path, line, "negatives")
    return tuple(
        check_text(negative, path, line, f"negatives[{index}]")
        for index, negative in enumerate(negatives)
    )


def _parse_scores(
    record: dict[str, Any], path: PathArg, line: int, negatives: int
) -> tuple[float, ...] | None:
    if "scores" not in record:
        return None
    scores = record["scores"]
    if not isinstance(scores, list):
        raise DataError(
            f"expected an array of numbers, got {describe(scores)}", path, line, "scores"
        )
    # Each value first: a nested array is named as such, not as a wrong count.
    values = tuple(check_number(v, path, line, f"scores[{i}]") for i, v in enumerate(scores))
    if len(values) != 1 + negatives:
        reason = (
            f"{_count(len(values), 'score')} for 1 positive and {_count(negatives, 'negative')}"
            f"; give {1 + negatives}, one teacher score per text: the positive's, then each "
            "negative's"
        )
        raise DataError(reason, path, line, "scores")
    return values


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def load_triplets(path: str | os.PathLike[str]) -> list[Triplet]:
    """Load ``{"query": str, "positive": str, "negatives": [str, ...]}`` records.

    ``"negative": str`` is accepted as a single negative. Every record must have the same
    number of negatives, because batches stack them into one tensor. An optional
    ``"scores": [number, ...]`` holds teacher scores for distillation (``loss=margin_mse``,
    ``loss=listwise_kl``): the positive's, then each negative's, as ``mine.py teacher.path=``
    writes them; every record has them, or none.
    """
    triplets: list[Triplet] = []
    first_line = 0
    for line_no, record in iter_jsonl(path):
        negatives = _parse_negatives(record, path, line_no)
        triplet = Triplet(
            text_field(record, "query", path, line_no),
            text_field(record, "positive", path, line_no),
            negatives,
            _parse_scores(record, path, line_no, len(negatives)),
            source=f"{os.fspath(path)}:{line_no}",
        )
        if not triplets:
            first_line = line_no
        elif len(triplet.negatives) != len(triplets[0].negatives):
            reason = (
                f"{len(triplet.negatives)} negatives, but line {first_line} has "
                f"{len(triplets[0].negatives)}; every record needs the same number"
            )
            raise DataError(reason, path, line_no, "negatives")
        elif (triplet.scores is None) != (triplets[0].scores is None):
            # A broken file either way: a distillation loss needs every record's scores, and
            # any other loss ignores them.
            reason = (
                f"required field is missing: line {first_line} has teacher scores, so every "
                "record needs them"
                if triplet.scores is None
                else f"line {first_line} has no teacher scores: give every record scores, or none"
            )
            raise DataError(reason, path, line_no, "scores")
        triplets.append(triplet)
    if not triplets:
        raise DataError("no records", path)
    return triplets


def _parse_scored_pair(record: dict[str, Any], path: PathArg, line: int) -> ScoredPair:
    return ScoredPair(
        text_field(record, "text1", path, line),
        text_field(record, "text2", path, line),
        number_field(record, "score", path, line),
        source=f"{os.fspath(path)}:{line}",
    )


def load_scored_pairs(path: str | os.PathLike[str]) -> list[ScoredPair]:
    """Load ``{"text1": str, "text2": str, "score": number}`` records; each pair's ``source``
    is ``"path:line"``."""
    return _load(path, _parse_scored_pair)


def _parse_labelled(record: dict[str, Any], path: PathArg, line: int) -> LabelledText:
    text = text_field(record, "text", path, line)
    if "label" not in record:
        raise DataError("required field is missing", path, line, "label")
    label = record["label"]
    # bool is an int subclass in Python, but `true` is not a class label.
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        reason = f"expected an integer or a string, got {describe(label)}"
        raise DataError(reason, path, line, "label")
    if isinstance(label, str) and not label.strip():
        raise DataError("empty label", path, line, "label")
    return LabelledText(text, label)


def load_labelled(path: str | os.PathLike[str]) -> list[LabelledText]:
    """Load ``{"text": str, "label": int | str}`` records."""
    return _load(path, _parse_labelled)


def pairs_from_beir(ds: BeirDataset) -> list[Pair]:
    """One Pair (query text, ``doc.full_text``) per qrels entry with relevance > 0.

    Sorted by query id, then document id. Raises DataError naming the qrels file when no
    entry has relevance > 0: there would be nothing to train on.
    """
    pairs = [
        Pair(ds.queries[query_id], ds.corpus[doc_id].full_text)
        for query_id in sorted(ds.qrels)
        for doc_id, relevance in sorted(ds.qrels[query_id].items())
        if relevance > 0
    ]
    if not pairs:
        rows = sum(len(judged) for judged in ds.qrels.values())
        reason = (
            f"no training pair: no score is above 0 in the {rows} qrels rows of these "
            f"{len(ds.qrels)} queries"
        )
        raise DataError(reason, ds.qrels_path, field="score")
    return pairs
