"""Which generated queries are kept: length bounds, near-copies of the document, duplicates,
and the round trip (the source document must rank in the top k for its query)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from biencoder.data.synthesis.parsing import word_key, words
from biencoder.retrieval.retrievers import Hits

ROUND_TRIPS = ("none", "bm25", "dense", "both")


@dataclass
class FilterOptions:
    """Which generated queries are kept.

    ``round_trip``: keep a query only if its source document is in the top
    ``round_trip_k`` for it under ``bm25``, the ``dense`` bi-encoder, or ``both`` (each);
    ``none`` keeps all. ``min_words``/``max_words`` bound its length in words (null: no
    bound). ``max_overlap`` drops a query more than that share of whose word trigrams are
    in its document (near-copies; null: no check). ``dedup`` drops a query whose words
    are those of a query kept before (anywhere in the file), or, within a document, whose
    word set overlaps a kept one's by Jaccard ``>= dedup_threshold``.
    """

    round_trip: str = "bm25"
    round_trip_k: int = 3
    min_words: int | None = 3
    max_words: int | None = 40
    max_overlap: float | None = None
    dedup: bool = True
    dedup_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.round_trip not in ROUND_TRIPS:
            raise ValueError(
                f"round_trip: {self.round_trip!r} is not one of {', '.join(ROUND_TRIPS)}"
            )
        if self.round_trip_k < 1:
            raise ValueError(f"round_trip_k: must be positive, got {self.round_trip_k}")
        if self.min_words is not None and self.min_words < 1:
            raise ValueError(f"min_words: must be positive or null, got {self.min_words}")
        if (
            self.max_words is not None
            and self.min_words is not None
            and self.max_words < self.min_words
        ):
            raise ValueError(f"max_words: {self.max_words} is below min_words={self.min_words}")
        if self.max_overlap is not None and not 0 <= self.max_overlap <= 1:
            raise ValueError(f"max_overlap: must be in [0, 1] or null, got {self.max_overlap}")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold: must be in (0, 1], got {self.dedup_threshold}")

    @property
    def retrievers(self) -> tuple[str, ...]:
        return {"none": (), "bm25": ("bm25",), "dense": ("dense",), "both": ("bm25", "dense")}[
            self.round_trip
        ]


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|a ∩ b| / |a ∪ b| of two word collections (as sets); 1.0 for two empty ones."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def trigram_overlap(query: str, document: str) -> float:
    """The share of ``query``'s distinct word trigrams that occur in ``document``; 0.0 for
    a query of fewer than three words."""
    grams = set(_trigrams(words(query)))
    return len(grams & set(_trigrams(words(document)))) / len(grams) if grams else 0.0


def _trigrams(tokens: list[str]) -> Iterable[tuple[str, ...]]:
    return zip(tokens, tokens[1:], tokens[2:], strict=False)


def length_check(query: str, options: FilterOptions) -> str:
    """``"ok"``, ``"too_short"`` or ``"too_long"`` for ``query``'s word count."""
    count = len(words(query))
    if options.min_words is not None and count < options.min_words:
        return "too_short"
    if options.max_words is not None and count > options.max_words:
        return "too_long"
    return "ok"


class Deduplicator:
    """Remembers kept queries: exact (by words) across everything ``add``ed, near (by
    Jaccard) within the current document."""

    def __init__(self, threshold: float, seen: Iterable[str] = ()):
        self.threshold = threshold
        self.seen = {word_key(q) for q in seen}

    def is_duplicate(self, query: str, kept_for_document: Sequence[str]) -> bool:
        if word_key(query) in self.seen:
            return True
        return any(jaccard(words(query), words(k)) >= self.threshold for k in kept_for_document)

    def add(self, query: str) -> None:
        self.seen.add(word_key(query))


def round_trip_ranks(hits: Hits, rows: Sequence[int]) -> list[int | None]:
    """1-based rank of ``rows[i]`` among ``hits.ids[i]``, or None when it is not there."""
    ranks: list[int | None] = []
    for ids, row in zip(hits.ids, rows, strict=True):
        found = np.flatnonzero(ids == row)
        ranks.append(int(found[0]) + 1 if len(found) else None)
    return ranks
