"""Cheaper searches than float search at full dimension, for ``eval.py funnel.dim=...`` and
``eval.py quantization=...``: a Matryoshka funnel (search truncated embeddings, re-rank the
candidates at full dimension) and quantised document embeddings (int8 scalar quantisation,
binary sign bits with Hamming distance, optionally re-ranked with float embeddings).

The searches return FAISS-style ``(scores, ids)``, ``[Q, k]``, best first, scores
higher-is-better, ids ``-1`` where fewer than ``k`` documents were found.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch

from biencoder.evaluation.config import FunnelConfig, IndexSpec, QuantizationConfig
from biencoder.model.biencoder import truncate_embeddings
from biencoder.retrieval.search import build_index, check_index_dims, search

# Queries re-ranked per batch: gathering candidates takes queries × candidates × dim floats.
_RERANK_QUERIES = 1024


def check_funnel(funnel: FunnelConfig, ks: Sequence[int], width: int, index: IndexSpec) -> None:
    """Raise a ValueError starting with ``dim:`` or ``candidates:`` for a funnel that cannot
    work with a model of ``width`` dimensions, these cut-offs and this index; before any
    encoding."""
    if funnel.dim is None:
        return
    if funnel.dim >= width:
        raise ValueError(f"dim: must be below the model's {width} dimensions, got {funnel.dim}")
    if funnel.candidates < max(ks):
        raise ValueError(
            f"candidates: must be at least max(evaluation.ks) = {max(ks)}, got {funnel.candidates}"
        )
    try:
        check_index_dims(index.factory, [funnel.dim], metric=index.metric)
    except ValueError as err:
        raise ValueError(f"dim: evaluation.index cannot search it: {err}") from err


def check_quantization(
    quantization: QuantizationConfig, ks: Sequence[int], width: int, index: IndexSpec
) -> None:
    """Raise a ValueError starting with ``kind:`` or ``rescore:`` for a quantisation that
    cannot work with a model of ``width`` dimensions, these cut-offs and this index."""
    if quantization.kind == "none":
        return
    if index.factory != "Flat" or index.metric != "ip":
        # The quantised index replaces evaluation.index; another one would be ignored silently.
        raise ValueError(
            f"kind: quantization={quantization.kind} searches an index of its own by inner "
            f"product (Hamming for binary), so evaluation.index must be Flat with metric ip, "
            f"got {index.factory!r} with {index.metric!r}"
        )
    if quantization.kind == "binary" and width % 8:
        raise ValueError(f"kind: binary codes need a width divisible by 8, the model has {width}")
    if quantization.rescore is not None and quantization.rescore < max(ks):
        raise ValueError(
            f"rescore: must be at least max(evaluation.ks) = {max(ks)}, got {quantization.rescore}"
        )


def rerank(
    docs: torch.Tensor, queries: torch.Tensor, candidates: np.ndarray, k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Score each query's ``candidates`` (row ids, ``-1`` for none) against ``docs`` and
    ``queries`` exactly, and keep the best ``k``; ties keep the candidates' order."""
    ids = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.int64))
    k = min(k, ids.shape[1])
    best_scores, best_ids = [], []
    for start in range(0, len(ids), _RERANK_QUERIES):
        rows = ids[start : start + _RERANK_QUERIES]
        q = queries[start : start + _RERANK_QUERIES].float()
        found = docs.float()[rows.clamp(min=0)]  # [Q, C, dim]
        if metric == "ip":
            scores = torch.einsum("qd,qcd->qc", q, found)
        else:
            scores = -(found - q[:, None]).square().sum(dim=-1)
        scores = scores.masked_fill(rows < 0, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_scores.append(scores.gather(1, order))
        best_ids.append(rows.gather(1, order))
    return torch.cat(best_scores).numpy(), torch.cat(best_ids).numpy()


def funnel_index(
    docs: torch.Tensor, funnel: FunnelConfig, *, normalize: bool, index: IndexSpec
) -> faiss.Index:
    """``index`` over the documents truncated to ``funnel.dim`` (re-normalised if
    ``normalize``): the funnel's first stage."""
    return build_index(
        truncate_embeddings(docs, funnel.dim, normalize).numpy(),
        index.factory,
        metric=index.metric,
        use_gpu=index.use_gpu,
        train_size=index.train_size,
    )


def funnel_search(
    first: faiss.Index,
    docs: torch.Tensor,
    queries: torch.Tensor,
    funnel: FunnelConfig,
    k: int,
    *,
    normalize: bool,
    index: IndexSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``first`` (from :func:`funnel_index`) with the truncated queries, keep
    ``funnel.candidates`` per query and return the best ``k`` of them by full-dimension score
    (inner product, or negated squared L2 for ``metric: l2``)."""
    low_queries = truncate_embeddings(queries, funnel.dim, normalize).numpy()
    _, candidates = search(
        first, low_queries, funnel.candidates, nprobe=index.nprobe, ef_search=index.ef_search
    )
    return rerank(docs, queries, candidates, k, index.metric)


class QuantizedIndex:
    """Document embeddings stored as int8 or binary codes, searched as FAISS does.

    ``bytes_per_doc`` is the size of one document's code: ``dim`` for int8, ``dim / 8`` for
    binary. int8 keeps queries float (FAISS decodes the documents' codes against them):
    quantising the query too would only add error, since queries are never stored. Binary
    quantises queries to sign bits as well, as Hamming distance needs; its scores are
    ``dim - 2 * hamming``, the inner product of the ±1 vectors.
    """

    def __init__(self, docs: torch.Tensor, kind: str) -> None:
        x = np.ascontiguousarray(docs.float().numpy())
        self.kind = kind
        self.dim = x.shape[1]
        if kind == "int8":
            self.index = faiss.IndexScalarQuantizer(
                self.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            self.index.train(x)  # per-dimension min and max over the corpus
            self.index.add(x)
        elif kind == "binary":
            self.index = faiss.IndexBinaryFlat(self.dim)
            self.index.add(np.packbits(x > 0, axis=1))
        else:
            raise ValueError(f"kind: must be int8 or binary, got {kind!r}")
        self.bytes_per_doc = int(self.index.code_size)

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries.float().numpy())
        k = min(k, self.index.ntotal)
        if self.kind == "int8":
            return self.index.search(q, k)
        hamming, ids = self.index.search(np.packbits(q > 0, axis=1), k)
        return (self.dim - 2 * hamming).astype(np.float32), ids


def quantized_search(
    index: QuantizedIndex,
    docs: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    rescore: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` documents by quantised score, or, with ``rescore``, the best ``k`` of
    the top ``rescore`` by quantised score re-ranked with the float ``docs`` and ``queries``
    (which rescoring reads for those candidates only: they are not part of the index)."""
    if rescore is None:
        return index.search(queries, k)
    _, candidates = index.search(queries, rescore)
    return rerank(docs, queries, candidates, k)
