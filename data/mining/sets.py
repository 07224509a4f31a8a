"""What mining reads: a corpus of distinct texts and the queries to mine negatives for, with
their positives and the rows never to take as negatives, from a BEIR split or from pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from biencoder.data.beir import BeirDataset
from biencoder.data.errors import DataError
from biencoder.data.training import Pair


@dataclass(frozen=True)
class MiningQuery:
    """A query of a :class:`MiningSet`: ``positives`` and ``excluded`` are corpus rows."""

    key: str  # the BEIR query id, or the text for pairs: seeds the query's sampling
    text: str
    positives: tuple[int, ...]  # one n-tuple line each, in output order
    excluded: frozenset[int]  # never a negative: the positives and any other judged row


@dataclass(frozen=True)
class MiningSet:
    """A corpus of distinct texts and the queries to mine negatives for, in output order."""

    corpus: list[str]
    queries: list[MiningQuery]


def mining_set_from_beir(dataset: BeirDataset) -> MiningSet:
    """Queries in id order, each with its relevant (relevance > 0) documents as positives in
    id order; every document judged for a query, at any relevance, is excluded from its
    negatives. Documents of identical text are one corpus row (as sentence-transformers
    deduplicates), so a copy of a positive is never a negative. Queries without a relevant
    document have nothing to pair a negative with and are left out.

    Raises DataError naming the qrels file when no query has a relevant document."""
    rows: dict[str, int] = {}
    for doc in dataset.corpus.values():
        rows.setdefault(doc.full_text, len(rows))

    def row(doc_id: str) -> int:
        return rows[dataset.corpus[doc_id].full_text]

    queries = []
    for query_id in sorted(dataset.qrels):
        judged = dataset.qrels[query_id]
        positives = tuple(dict.fromkeys(row(d) for d, rel in sorted(judged.items()) if rel > 0))
        if positives:
            excluded = frozenset(row(d) for d in judged)
            queries.append(MiningQuery(query_id, dataset.queries[query_id], positives, excluded))
    if not queries:
        raise DataError("no qrels row of these queries has a score above 0", dataset.qrels_path)
    return MiningSet(list(rows), queries)


def mining_set_from_pairs(pairs: Sequence[Pair]) -> MiningSet:
    """The corpus is the distinct positives; pairs of the same query text are one query
    with all their positives, none of which is a negative for it (sentence-transformers'
    rules). Queries and positives keep their order of first appearance."""
    rows: dict[str, int] = {}
    grouped: dict[str, dict[int, None]] = {}
    for pair in pairs:
        row = rows.setdefault(pair.positive, len(rows))
        grouped.setdefault(pair.query, {})[row] = None
    queries = [
        MiningQuery(text, text, tuple(positives), frozenset(positives))
        for text, positives in grouped.items()
    ]
    return MiningSet(list(rows), queries)
