"""Retrievers over a corpus of texts: the top ``k`` rows of each text query, and the scores
of rows the caller asks about, on the same scale. Hard-negative mining and the round trip of
synthetic queries search with them.

    retriever = DenseRetriever(model, corpus)  # or BM25Retriever(corpus)
    hits = retriever.search(queries, k=10, rows=[(0,), (5, 7)])  # rows: each query's positives
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from biencoder.retrieval.bm25 import BM25, top_k
from biencoder.retrieval.search import build_index, search

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

# Query-by-document score blocks of the dense search stay under this many floats (256 MB).
_DENSE_BLOCK = 1 << 26


@dataclass
class Hits:
    """Search results for a batch of queries: ``ids`` [B, k] corpus rows (-1: none) and
    their ``scores``, best first, and ``scores_of`` the scores of the rows each query asked
    about (its positives)."""

    scores: np.ndarray
    ids: np.ndarray
    scores_of: list[np.ndarray]


class Retriever(Protocol):
    """What mining and the synthetic queries' round trip search with: the top ``k`` corpus
    rows of each query, and the scores of the given ``rows`` (its positives) on the same
    scale."""

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits: ...


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    return (
        np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf),
        np.pad(ids, ((0, 0), (0, missing)), constant_values=-1),
    )


class DenseRetriever:
    """Nearest neighbours by inner product of ``model``'s normalised embeddings.

    The corpus is embedded once (``kind="doc"``, the model's document prefix), unless
    ``embeddings`` gives them already (one row per corpus text, from an earlier run), and
    indexed with FAISS through :func:`retrieval.search.build_index`: ``factory="Flat"`` is
    exact, any other factory string (``"HNSW32"``, ``"IVF1024,PQ32"``) approximate, on the
    GPUs when faiss sees any. Positives are scored exactly, from the stored embeddings.
    """

    def __init__(
        self,
        model: BiEncoder,
        corpus: list[str],
        *,
        factory: str = "Flat",
        batch_size: int = 64,
        seed: int = 0,
        embeddings: np.ndarray | None = None,
    ):
        self.model, self.batch_size = model, batch_size
        if embeddings is None:
            embeddings = model.encode(
                corpus, kind="doc", batch_size=batch_size, normalize=True, show_progress=True
            ).numpy()
        elif len(embeddings) != len(corpus):
            raise ValueError(f"embeddings: {len(embeddings)} rows for {len(corpus)} texts")
        self.embeddings = embeddings
        self.index = build_index(self.embeddings, factory, metric="ip", seed=seed)

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits:
        embedded = self.model.encode(
            queries,
            kind="query",
            batch_size=self.batch_size,
            normalize=True,
            show_progress=False,
        ).numpy()
        scores, ids = _pad(*search(self.index, embedded, k), k)
        scores_of = [self.embeddings[list(r)] @ q for q, r in zip(embedded, rows, strict=True)]
        return Hits(scores, ids, scores_of)


class BM25Retriever:
    """:class:`BM25` top hits (documents sharing a word with the query, so possibly fewer
    than asked for); scores are BM25 scores, which margins and score bounds then compare."""

    def __init__(self, corpus: list[str]):
        self.index = BM25(corpus)

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores_of = []
        for i, (query, asked) in enumerate(zip(queries, rows, strict=True)):
            # One query's scores over the corpus at a time: memory stays O(corpus).
            row_scores = self.index.scores(query)
            top = top_k(row_scores, k)
            scores[i, : len(top)], ids[i, : len(top)] = row_scores[top], top
            scores_of.append(row_scores[list(asked)])
        return Hits(scores, ids, scores_of)


def dense_top_k(
    model: BiEncoder, query_texts: list[str], doc_texts: list[str], depth: int
) -> list[list[int]]:
    """The indices of each query's ``depth`` best documents of ``doc_texts`` by the inner
    product of ``model``'s embeddings (exact, in blocks of queries), best first."""
    queries = model.encode(query_texts, kind="query")
    docs = model.encode(doc_texts, kind="doc")
    k = min(depth, len(doc_texts))
    rows = max(1, _DENSE_BLOCK // max(1, len(doc_texts)))
    ranked: list[list[int]] = []
    blocks = range(0, len(queries), rows)
    for start in tqdm(blocks, desc="dense search", unit="block", disable=len(blocks) <= 1):
        ranked += torch.topk(queries[start : start + rows] @ docs.T, k, dim=1).indices.tolist()
    return ranked
