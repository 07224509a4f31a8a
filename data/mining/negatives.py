"""Hard negatives for retrieval training: BM25 or dense top hits that are not judged relevant.

The light entry point, which ``train.py`` mines with at startup:

    dataset = load_beir(SCIFACT_DIR, "train")
    negatives = mine_hard_negatives(dataset, num_negatives=4)  # query id -> doc ids
    triplets = triplets_from_beir(dataset, negatives)  # one Triplet per relevant pair

Mining as a step of its own (``python mine.py``) is :mod:`data.mining.pipeline`'s.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Literal

from biencoder.data.beir import BeirDataset
from biencoder.data.errors import DataError
from biencoder.data.training import Triplet
from biencoder.retrieval.bm25 import bm25_top_k
from biencoder.retrieval.retrievers import dense_top_k

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)


def mine_hard_negatives(
    dataset: BeirDataset,
    num_negatives: int,
    *,
    method: Literal["bm25", "dense"] = "bm25",
    depth: int = 30,
    skip_top: int = 0,
    seed: int = 0,
    model: BiEncoder | None = None,
) -> dict[str, list[str]]:
    """Map each query id of ``dataset`` to up to ``num_negatives`` hard-negative doc ids.

    Candidates are the top ``depth`` hits of BM25 over ``Document.full_text`` or, with
    ``method="dense"``, of ``model``'s embeddings (exact inner product); the first
    ``skip_top`` ranks are skipped (their unjudged hits are the likeliest unlabelled
    positives), then every document judged for the query, at any relevance, is removed.
    ``num_negatives`` are sampled from the rest by a generator seeded with ``seed`` and the
    query id, so the result does not depend on which other queries are mined. Queries with
    fewer candidates get all of them, in sampled order; they are counted in the log.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if not 0 <= skip_top < depth:
        raise ValueError(f"need 0 <= skip_top < depth, got skip_top={skip_top}, depth={depth}")
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[doc_id].full_text for doc_id in doc_ids]
    query_ids = sorted(dataset.queries)
    query_texts = [dataset.queries[query_id] for query_id in query_ids]
    if method == "bm25":
        ranked = bm25_top_k(query_texts, doc_texts, depth)
    elif method == "dense":
        if model is None:
            raise ValueError("method='dense' needs a model")
        ranked = dense_top_k(model, query_texts, doc_texts, depth)
    else:
        raise ValueError(f"method must be 'bm25' or 'dense', got {method!r}")

    negatives: dict[str, list[str]] = {}
    short = 0
    for query_id, hits in zip(query_ids, ranked, strict=True):
        judged = dataset.qrels.get(query_id, {})
        candidates = [doc_ids[doc] for doc in hits[skip_top:] if doc_ids[doc] not in judged]
        rng = random.Random(f"{seed}:{query_id}")
        negatives[query_id] = rng.sample(candidates, min(num_negatives, len(candidates)))
        short += len(candidates) < num_negatives
    if short:
        log.info(
            "%d of %d queries have fewer than %d %s negatives in the top %d",
            short,
            len(query_ids),
            num_negatives,
            method,
            depth,
        )
    return negatives


def triplets_from_beir(
    dataset: BeirDataset, negatives: dict[str, list[str]], num_negatives: int | None = None
) -> list[Triplet]:
    """One Triplet per relevant (relevance > 0) query-document pair, sorted by query id then
    document id, each with ``num_negatives`` negatives (default: the longest list given).

    A query with fewer mined negatives repeats its list cyclically to fill up, as batches
    need equal counts; one with none has its pairs dropped. Both are counted in a warning.
    Raises DataError naming the qrels file when no triplet is left.
    """
    if num_negatives is None:
        num_negatives = max((len(found) for found in negatives.values()), default=0)
    if num_negatives < 1:
        raise ValueError("no negatives to build triplets from")
    triplets: list[Triplet] = []
    padded = dropped = 0
    for query_id in sorted(dataset.qrels):
        judged = sorted(dataset.qrels[query_id].items())
        positives = [doc_id for doc_id, relevance in judged if relevance > 0]
        found = negatives.get(query_id, [])
        if not found:
            dropped += len(positives)
            continue
        if len(found) < num_negatives:
            padded += len(positives)
        negative_texts = tuple(
            dataset.corpus[found[i % len(found)]].full_text for i in range(num_negatives)
        )
        query = dataset.queries[query_id]
        triplets += [
            Triplet(query, dataset.corpus[doc_id].full_text, negative_texts) for doc_id in positives
        ]
    if not triplets:
        # An empty list would surface only later, as a batch size that no batch can fill.
        reason = (
            f"no triplet: all {dropped} relevant pairs belong to queries without a negative"
            if dropped
            else "no triplet: no qrels row of these queries has a score above 0"
        )
        raise DataError(reason, dataset.qrels_path)
    if padded or dropped:
        log.warning(
            "%d pairs have fewer than %d negatives, repeated to fill up; %d pairs dropped "
            "for having none",
            padded,
            num_negatives,
            dropped,
        )
    return triplets
