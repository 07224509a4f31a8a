"""Retrievers over a corpus of texts: the top ``k`` rows of each text query, and the scores
of rows the caller asks about, on the same scale. Hard-negative mining and the round trip of
synthetic queries search with them.

    retriever = DenseRetriever(model, corpus)  # or BM25Retriever(corpus)
    hits = retriever.search(queries, k=10, rows=[(0,), (5, 7)])  # rows: each query's positives
    retriever = DenseRetriever(model, corpus, store=run_dir / "embeddings")  # encoded once
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from biencoder.retrieval.bm25 import BM25, top_k
from biencoder.retrieval.search import TorchFlatIndex, build_index, search, train_index
from biencoder.retrieval.store import (
    SHARD_ROWS,
    Embeddings,
    InMemoryEmbeddings,
    Transform,
    encode_to_store,
    search_embeddings,
)

if TYPE_CHECKING:
    import faiss

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

    The corpus (``kind="doc"``, the model's document prefix) comes from one of:

    - ``store``: a folder of embedding stores (:mod:`retrieval.store`), where the corpus is
      looked up by the fingerprints of the weights, ``ids`` (default: the row numbers) and
      texts, and encoded shard by shard only where missing (``shard_rows`` rows a shard),
      so a rerun with the same model and corpus, or one after a crash, encodes nothing or
      only the shards it lacks (``store_setting``: the configuration key that named the
      folder, for the error when another process is writing the entry);
    - ``embeddings``: raw embeddings already made, one row per corpus text, in memory or in
      a store;
    - neither: the corpus is embedded in memory, normalised.

    Stored rows are raw: they are normalised shard by shard as they are read. Exact search
    (``factory="Flat"``) over a store streams its shards for each batch of queries, so the
    corpus is never in memory whole; any other factory string (``"HNSW32"``,
    ``"IVF1024,PQ32"``) is trained on the corpus and filled shard by shard once, and
    in-memory rows are indexed once, through :func:`retrieval.search.build_index` (on the
    GPUs when faiss sees any). Positives are scored exactly, from the rows they ask for.
    """

    def __init__(
        self,
        model: BiEncoder,
        corpus: list[str],
        *,
        factory: str = "Flat",
        batch_size: int = 64,
        seed: int = 0,
        embeddings: Embeddings | None = None,
        store: str | Path | None = None,
        ids: Sequence[str] | None = None,
        shard_rows: int = SHARD_ROWS,
        store_setting: str = "store",
    ):
        if embeddings is not None and store is not None:
            raise ValueError(
                "embeddings and store: give the corpus embeddings or a store, not both"
            )
        self.model, self.batch_size, self.factory = model, batch_size, factory
        ids = [str(row) for row in range(len(corpus))] if ids is None else list(ids)
        if store is not None:
            embeddings = encode_to_store(
                model,
                ids,
                corpus,
                "doc",
                store,
                shard_rows=shard_rows,
                batch_size=batch_size,
                setting=store_setting,
            )
        if embeddings is None:
            array = model.encode(
                corpus, kind="doc", batch_size=batch_size, normalize=True, show_progress=True
            ).numpy()
            embeddings = InMemoryEmbeddings(array, ids)
            # Normalised by encode, as store rows are by _normalized: not twice.
            self._transform: Transform = np.asarray
        else:
            if len(embeddings) != len(corpus):
                raise ValueError(f"embeddings: {len(embeddings)} rows for {len(corpus)} texts")
            self._transform = _normalized
        self.embeddings = embeddings
        self.index = self._index(seed)

    def _index(self, seed: int) -> faiss.Index | TorchFlatIndex | None:
        """One index for every search, or None where exact search streams the store."""
        if isinstance(self.embeddings, InMemoryEmbeddings):
            vectors = self._transform(self.embeddings.array)
            return build_index(vectors, self.factory, metric="ip", seed=seed)
        if self.factory == "Flat":
            return None
        # As search_embeddings indexes a store: trained on every row, then filled shard by
        # shard, so only the index holds the corpus once training is done.
        sample = self._transform(self.embeddings.load())
        index = train_index(sample, self.factory, metric="ip")
        del sample
        for _, shard in self.embeddings.shards():
            index.add(np.ascontiguousarray(self._transform(shard), dtype=np.float32))
        return index

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The normalised embeddings of corpus ``rows``, ``[len(rows), dim]``."""
        return self._transform(self.embeddings.rows(rows))

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits:
        embedded = self.model.encode(
            queries,
            kind="query",
            batch_size=self.batch_size,
            normalize=True,
            show_progress=False,
        ).numpy()
        if self.index is None:
            found = search_embeddings(
                self.embeddings, embedded, k, factory="Flat", transform=self._transform
            )
        else:
            found = search(self.index, embedded, k)
        scores, ids = _pad(*found, k)
        # The batch's positives read at once: one pass over the shards.
        asked = sorted({row for query_rows in rows for row in query_rows})
        position = {row: i for i, row in enumerate(asked)}
        vectors = self.vectors(asked)
        scores_of = [
            vectors[[position[row] for row in query_rows]] @ q
            for q, query_rows in zip(embedded, rows, strict=True)
        ]
        return Hits(scores, ids, scores_of)


def _normalized(rows: np.ndarray) -> np.ndarray:
    """``rows`` (raw embeddings, possibly memory-mapped) scaled to unit length as
    ``BiEncoder.encode(normalize=True)`` scales them."""
    return F.normalize(torch.from_numpy(np.array(rows, dtype=np.float32)), dim=-1).numpy()


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
