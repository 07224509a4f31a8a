"""Ranking metrics with trec_eval semantics, in numpy.

The numbers equal those of pytrec_eval (the trec_eval C code) as BEIR uses it, so results are
comparable with published BEIR tables; ``tests/test_metrics.py`` checks this against pytrec_eval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Run = dict[str, dict[str, float]]
"""Query id -> document id -> score (higher is better)."""

Qrels = dict[str, dict[str, int]]
"""Query id -> document id -> graded relevance."""

METRIC_FAMILIES: tuple[str, ...] = ("ndcg", "mrr", "recall", "map", "precision")
DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 100)


def trec_order(
    doc_scores: Mapping[str, float], depth: int | None = None
) -> list[tuple[str, float]]:
    """Rank one query's documents the way trec_eval does.

    trec_eval sorts by score descending and breaks ties by document id descending, compared as
    strings (``strcmp``, which for UTF-8 is the same order as Python's ``str`` comparison); the
    ranks in the input file are ignored.

    Args:
        doc_scores: document id -> score.
        depth: keep only the first ``depth`` documents; ``None`` keeps all.

    Returns:
        ``(doc_id, score)`` pairs, best first, scores as Python floats.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be a positive integer or None, got {depth}")
    docs = list(doc_scores)
    scores = np.fromiter(doc_scores.values(), dtype=np.float64, count=len(docs))
    if depth is not None and depth < len(docs):
        # Only documents scoring at least the depth-th best score can make the cut (ties
        # included); selecting them in numpy first avoids sorting long runs in Python.
        kth = np.partition(scores, len(docs) - depth)[len(docs) - depth]
        keep = np.flatnonzero(scores >= kth).tolist()
        pairs = zip(scores[keep].tolist(), [docs[i] for i in keep], strict=True)
    else:
        pairs = zip(scores.tolist(), docs, strict=True)
    # Sorting (score, doc) tuples in reverse is exactly trec_eval's order.
    return [(doc, score) for score, doc in sorted(pairs, reverse=True)[:depth]]


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every cutoff in ks must be a positive integer, got {k!r}")
    return [int(k) for k in ks]


def _query_metrics(
    doc_scores: Mapping[str, float],
    judgments: Mapping[str, int],
    ks: list[int],
    relevance_threshold: int,
) -> dict[str, float]:
    ranked = trec_order(doc_scores, depth=max(ks))
    n = len(ranked)
    rels = np.array([judgments.get(doc, 0) for doc, _ in ranked], dtype=np.float64)
    judged = np.fromiter(judgments.values(), dtype=np.float64, count=len(judgments))

    # nDCG uses the raw grade as gain whatever the threshold; only grades > 0 count.
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2, dtype=np.float64))
    dcg = np.cumsum(np.where(rels > 0, rels, 0.0) * discounts[:n])
    ideal = np.sort(judged[judged > 0])[::-1][: max(ks)]
    idcg = np.cumsum(ideal * discounts[: len(ideal)])

    is_rel = rels >= relevance_threshold
    num_rel = int(np.count_nonzero(judged >= relevance_threshold))
    hits = np.cumsum(is_rel)
    precision_at_hits = np.cumsum(np.where(is_rel, hits / np.arange(1, n + 1), 0.0))
    first_hit = int(np.argmax(is_rel)) + 1 if is_rel.any() else None

    out: dict[str, float] = {}
    for k in ks:
        last = min(k, n) - 1  # -1 when the run is empty for this query
        dcg_k = dcg[last] if last >= 0 else 0.0
        idcg_k = idcg[min(k, len(idcg)) - 1] if len(idcg) else 0.0
        hits_k = int(hits[last]) if last >= 0 else 0
        out[f"ndcg@{k}"] = float(dcg_k / idcg_k) if idcg_k > 0 else 0.0
        out[f"mrr@{k}"] = 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0
        out[f"recall@{k}"] = hits_k / num_rel if num_rel else 0.0
        ap_sum = precision_at_hits[last] if last >= 0 else 0.0
        out[f"map@{k}"] = float(ap_sum / num_rel) if num_rel else 0.0
        out[f"precision@{k}"] = hits_k / k
    return {f"{family}@{k}": out[f"{family}@{k}"] for family in METRIC_FAMILIES for k in ks}


def per_query_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    relevance_threshold: int = 1,
) -> dict[str, dict[str, float]]:
    """Per-query ``ndcg@k``, ``mrr@k``, ``recall@k``, ``map@k`` and ``precision@k``.

    Semantics are trec_eval's (as computed by pytrec_eval):

    - ``ndcg@k`` is ``ndcg_cut_k``: gain = relevance grade (grades <= 0 give no gain, whatever
      ``relevance_threshold``), discount ``log2(rank + 1)``, ideal DCG from all judged documents
      with grade > 0, retrieved or not.
    - ``map@k`` is ``map_cut_k`` (divided by the number of relevant documents, not by ``k``),
      ``recall@k`` is ``recall_k``, ``precision@k`` is ``P_k`` (divided by ``k`` even if fewer
      documents were retrieved).
    - ``mrr@k`` is ``recip_rank`` on the run cut to its top ``k``.
    - A document is relevant when its grade is ``>= relevance_threshold`` (trec_eval's
      ``relevance_level``, default 1); unjudged documents have grade 0, negative grades are
      non-relevant.
    - Documents are ranked by score descending, ties by document id descending (``trec_order``).

    Which queries are evaluated also follows pytrec_eval: those present in ``run`` (even with no
    documents) that have at least one judgment in ``qrels``. Queries of ``run`` without judgments
    are skipped; queries of ``qrels`` missing from ``run`` are skipped too (not scored as 0). A
    query whose judgments are all non-relevant is evaluated and scores 0 everywhere.

    Args:
        run: query id -> document id -> score.
        qrels: query id -> document id -> relevance grade.
        ks: cutoffs, positive integers.
        relevance_threshold: minimum grade counted as relevant, >= 1 as in trec_eval.

    Returns:
        query id -> metric name -> value, for the evaluated queries.
    """
    ks = _check_ks(ks)
    if isinstance(relevance_threshold, bool) or relevance_threshold < 1:
        raise ValueError(f"relevance_threshold must be >= 1 (trec_eval), got {relevance_threshold}")
    return {
        qid: _query_metrics(doc_scores, qrels[qid], ks, relevance_threshold)
        for qid, doc_scores in run.items()
        if qrels.get(qid)
    }


def retrieval_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    relevance_threshold: int = 1,
) -> dict[str, float]:
    """Mean of ``per_query_metrics`` over the evaluated queries.

    As in BEIR, the mean is over the queries pytrec_eval reports: those in ``run`` with at least
    one judgment in ``qrels``. A judged query absent from ``run`` is therefore not counted as a
    zero; give it an empty document dict in ``run`` to have it scored 0.

    Args:
        run: query id -> document id -> score.
        qrels: query id -> document id -> relevance grade.
        ks: cutoffs, positive integers.
        relevance_threshold: minimum grade counted as relevant, >= 1 as in trec_eval.

    Returns:
        metric name (``ndcg@10`` ...) -> mean value, families in the order
        ndcg, mrr, recall, map, precision, each over ``ks`` in the given order.

    Raises:
        ValueError: if no query of ``run`` is judged in ``qrels``.
    """
    per_query = per_query_metrics(run, qrels, ks, relevance_threshold=relevance_threshold)
    if not per_query:
        raise ValueError("no query of the run has judgments in qrels; nothing to evaluate")
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([m[name] for m in per_query.values()])) for name in names}


def to_run(
    scores: np.ndarray,
    ids: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
) -> Run:
    """Turn the rows of ``retrieval.search.search`` (or of a compressed search) into a run:
    query id -> document id -> score.

    Args:
        scores: ``[Q, k]`` higher-is-better scores.
        ids: ``[Q, k]`` row numbers into ``doc_ids``; ``-1`` (no neighbour) entries are dropped.
        query_ids: the id of each query row, unique.
        doc_ids: the id of each indexed embedding row, unique.
    """
    scores = np.asarray(scores)
    ids = np.asarray(ids)
    if scores.ndim != 2 or scores.shape != ids.shape:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must be equal 2-D shapes")
    if len(query_ids) != len(scores):
        raise ValueError(f"{len(query_ids)} query ids for {len(scores)} rows of results")
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids contains duplicates")
    if ids.size and (ids.min() < -1 or ids.max() >= len(doc_ids)):
        raise ValueError(f"ids must lie in [-1, {len(doc_ids)}) to index doc_ids")
    return {
        qid: {doc_ids[i]: s for i, s in zip(row_ids, row_scores, strict=True) if i != -1}
        for qid, row_scores, row_ids in zip(query_ids, scores.tolist(), ids.tolist(), strict=True)
    }
