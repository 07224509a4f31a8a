"""Hard negatives for retrieval training: BM25 or dense top hits that are not judged relevant.

    dataset = load_beir(SCIFACT_DIR, "train")
    negatives = mine_hard_negatives(dataset, num_negatives=4)  # query id -> doc ids
    triplets = triplets_from_beir(dataset, negatives)  # one Triplet per relevant pair

Progress bars show for loops over more than a thousand texts.
"""

from __future__ import annotations

import array
import logging
import random
import re
from collections import Counter
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .beir import BeirDataset
from .errors import DataError
from .training import Triplet

if TYPE_CHECKING:
    from model import BiEncoder

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
# Lucene's English stop words, as in the BM25 baselines of BEIR (Anserini).
# fmt: off
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
})
# fmt: on
_PROGRESS_MIN = 1000
# Query-by-document score blocks of the dense search stay under this many floats (256 MB).
_DENSE_BLOCK = 1 << 26


def tokenize(text: str, stopwords: Collection[str] = STOPWORDS) -> list[str]:
    """Lowercased ``\\w+`` words of ``text`` minus ``stopwords``; no stemming."""
    return [word for word in _WORD.findall(text.lower()) if word not in stopwords]


class BM25:
    """An in-memory BM25 index over ``corpus_texts``, for corpora up to a few million texts.

    score(q, d) = sum over the words t of q (repeats counted) of
    idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl)), with Lucene's
    idf(t) = log(1 + (N - df + 0.5) / (df + 0.5)). The defaults k1=0.9, b=0.4 are Anserini's.
    Lengths count words after stop-word removal, exactly (Lucene rounds them).
    """

    def __init__(
        self,
        corpus_texts: Sequence[str],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: Collection[str] = STOPWORDS,
    ):
        self.k1, self.b, self.stopwords = k1, b, stopwords
        self.vocabulary: dict[str, int] = {}
        terms, docs, tfs = array.array("i"), array.array("i"), array.array("f")
        lengths = np.zeros(len(corpus_texts), dtype=np.float64)
        progress = tqdm(
            corpus_texts, desc="BM25 index", unit="doc", disable=len(corpus_texts) <= _PROGRESS_MIN
        )
        for doc, text in enumerate(progress):
            words = tokenize(text, stopwords)
            lengths[doc] = len(words)
            for word, tf in Counter(words).items():
                terms.append(self.vocabulary.setdefault(word, len(self.vocabulary)))
                docs.append(doc)
                tfs.append(tf)
        term_of = np.frombuffer(terms, dtype=np.int32)
        # Postings grouped by term; a stable sort keeps each term's documents in order.
        order = np.argsort(term_of, kind="stable")
        df = np.bincount(term_of, minlength=len(self.vocabulary))
        self._starts = np.concatenate([[0], np.cumsum(df)])
        self._docs = np.frombuffer(docs, dtype=np.int32)[order]
        tf = np.frombuffer(tfs, dtype=np.float32)[order].astype(np.float64)
        n_docs = len(corpus_texts)
        self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        avgdl = lengths.mean() if n_docs else 0.0
        norm = k1 * (1 - b + b * lengths / avgdl) if avgdl else np.full(n_docs, k1)
        idf = self.idf[term_of[order]]
        self._weights = (idf * tf * (k1 + 1) / (tf + norm[self._docs])).astype(np.float32)
        self.num_docs = n_docs

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``: float32 [num_docs]."""
        scores = np.zeros(self.num_docs, dtype=np.float32)
        for word in tokenize(query, self.stopwords):
            term = self.vocabulary.get(word)
            if term is not None:
                start, end = self._starts[term], self._starts[term + 1]
                # A term lists each document once, so fancy-index += adds every posting.
                scores[self._docs[start:end]] += self._weights[start:end]
        return scores

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best (document index, score) pairs, best first; only documents sharing a
        word with the query, ties broken by lower index."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.scores(query)
        return [(int(i), float(scores[i])) for i in _top_k(scores, k)]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    matching = np.flatnonzero(scores > 0)
    if len(matching) > k:
        values = scores[matching]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above = matching[values > kth]
        # `matching` is ascending, so the lowest indices among the tied come first.
        tied = matching[values == kth][: k - len(above)]
        matching = np.concatenate([above, tied])
    return matching[np.lexsort((matching, -scores[matching]))]


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
        index = BM25(doc_texts)
        progress = tqdm(
            query_texts, desc="BM25 search", unit="query", disable=len(query_texts) <= _PROGRESS_MIN
        )
        ranked = [[doc for doc, _ in index.search(text, depth)] for text in progress]
    elif method == "dense":
        if model is None:
            raise ValueError("method='dense' needs a model")
        ranked = _dense_search(model, query_texts, doc_texts, depth)
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


def _dense_search(
    model: BiEncoder, query_texts: list[str], doc_texts: list[str], depth: int
) -> list[list[int]]:
    queries = model.encode(query_texts, kind="query")
    docs = model.encode(doc_texts, kind="doc")
    k = min(depth, len(doc_texts))
    rows = max(1, _DENSE_BLOCK // max(1, len(doc_texts)))
    ranked: list[list[int]] = []
    blocks = range(0, len(queries), rows)
    for start in tqdm(blocks, desc="dense search", unit="block", disable=len(blocks) <= 1):
        ranked += torch.topk(queries[start : start + rows] @ docs.T, k, dim=1).indices.tolist()
    return ranked


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
