"""Embedding-model evaluation: BEIR retrieval through FAISS, and STS correlation.

Both evaluators embed once at the model's full dimension and score every requested
Matryoshka dimension from truncations of the same embeddings. Both also report the
embedding geometry at full dimension (``evaluation.geometry``): ``alignment`` of positive
pairs, ``uniformity``, and ``norm_mean`` / ``norm_std`` / ``norm_min`` / ``norm_max`` of the
embeddings before normalisation.

Retrieval can also search a cheaper way (``evaluation.compressed``): a Matryoshka funnel or
quantised documents. That search then gives the unprefixed metrics and the run, and the
ordinary full-dimension float search of the same embeddings is reported beside it under
``flat/``.

Given a ``store`` folder, retrieval keeps its embeddings in an embedding store
(``retrieval.store``): what an earlier evaluation encoded with the same weights, texts and
settings is found there instead of encoded, and the corpus is searched shard by shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biencoder.data.beir import BeirDataset
from biencoder.data.sts import ScoredPair
from biencoder.evaluation.compressed import (
    QuantizedIndex,
    funnel_index,
    funnel_search,
    quantized_search,
)
from biencoder.evaluation.config import FunnelConfig, IndexSpec, QuantizationConfig
from biencoder.evaluation.geometry import geometry_metrics, norm_summary
from biencoder.evaluation.metrics import Run, retrieval_metrics, to_run
from biencoder.evaluation.sts import sts_metrics
from biencoder.model.biencoder import BiEncoder, truncate_embeddings
from biencoder.retrieval.search import check_index_dims
from biencoder.retrieval.store import (
    SHARD_ROWS,
    Embeddings,
    InMemoryEmbeddings,
    Sharding,
    encode_to_store,
    search_embeddings,
)

log = logging.getLogger(__name__)

# Documents uniformity is estimated on (geometry.uniformity's max_points).
UNIFORMITY_POINTS = 4096


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    run: Run
    timings: dict[str, float] = field(default_factory=dict)


def metric_key(name: str, dim: int | None, full_dim: int) -> str:
    """``ndcg@10`` at full dimension, ``dim64/ndcg@10`` at a Matryoshka truncation."""
    return name if dim is None or dim == full_dim else f"dim{dim}/{name}"


def evaluate_retrieval(
    model: BiEncoder,
    dataset: BeirDataset,
    *,
    ks: Sequence[int] = (1, 3, 5, 10, 100),
    index: IndexSpec | None = None,
    matryoshka_dims: Sequence[int] = (),
    batch_size: int = 64,
    ignore_identical_ids: bool = False,
    funnel: FunnelConfig | None = None,
    quantization: QuantizationConfig | None = None,
    store: Path | None = None,
    shard_rows: int = SHARD_ROWS,
    sharding: Sharding | None = None,
) -> RetrievalResult:
    """Embed corpus and queries, search the top ``max(ks)`` documents per query and score
    the run against the qrels. Returns metrics at full dimension plus ``dim{d}/``-prefixed
    metrics per Matryoshka dimension, and the full-dimension run.

    ``store``: a folder of embedding stores (``retrieval.store``). The corpus and the
    queries are then looked up there by the model's and the texts' fingerprints, encoded
    only where missing (``shard_rows`` rows per shard, resumable), and searched shard by
    shard, so the corpus is never in memory (but for a funnel or quantisation). Without
    one, everything is embedded in memory. ``sharding`` splits the encoding across
    processes, each writing its own shards: it needs a ``store`` they share. The timings say
    how many documents were encoded (``docs_encoded``; 0 when the store had them all).

    Geometry metrics: ``alignment`` over every judged relevant (query, document) pair,
    ``uniformity`` over the corpus (4,096 documents drawn when larger), norms over corpus
    and queries together.

    ``ignore_identical_ids`` drops a retrieved document whose id equals the query id
    (BEIR's convention for corpora that contain the queries, e.g. Quora, ArguAna).

    ``funnel`` (with a ``dim``) or ``quantization`` (other than ``none``) replace the
    full-dimension search: its metrics are the unprefixed ones, with ``search_ms_per_query``
    (and ``bytes_per_doc`` for quantisation), and the ordinary search's go under ``flat/``
    (``flat/ndcg@10``, ``flat/search_ms_per_query``, ``flat/bytes_per_doc``). Search times
    leave out building the index. Their settings are checked by ``evaluation.compressed``'s
    ``check_funnel`` and ``check_quantization``, which eval.py runs before encoding.

    Raises ValueError before encoding for Matryoshka dims the model or the index cannot
    take (``check_index_dims``), and after encoding for non-finite embeddings.
    """
    funnel = funnel if funnel is not None and funnel.dim is not None else None
    if quantization is not None and quantization.kind == "none":
        quantization = None
    if funnel is not None and quantization is not None:
        raise ValueError("funnel and quantization cannot be combined; choose one")
    if sharding is not None and sharding.world_size > 1 and store is None:
        raise ValueError("sharding: processes encoding together need a store they share")
    index = index or IndexSpec()
    doc_ids = list(dataset.corpus)
    query_ids = list(dataset.queries)
    timings = {}
    _check_matryoshka_dims(matryoshka_dims, model.dim)
    train_rows = len(doc_ids) if index.train_size is None else min(index.train_size, len(doc_ids))
    check_index_dims(
        index.factory,
        [model.dim, *matryoshka_dims],
        metric=index.metric,
        train_rows=train_rows,
    )

    def embed(ids: list[str], texts: list[str], kind: str, progress: bool) -> Embeddings:
        if store is None:
            array = model.encode(
                texts, kind=kind, batch_size=batch_size, show_progress=progress, normalize=False
            )
            return InMemoryEmbeddings(array.numpy(), ids)
        return encode_to_store(
            model,
            ids,
            texts,
            kind,
            store,
            shard_rows=shard_rows,
            batch_size=batch_size,
            show_progress=progress,
            sharding=sharding,
        )

    start = time.perf_counter()
    docs = embed(doc_ids, [dataset.corpus[i].full_text for i in doc_ids], "doc", True)
    timings["encode_corpus_s"] = time.perf_counter() - start
    timings["docs_encoded"] = docs.encoded
    if docs.encoded:
        timings["docs_per_s"] = docs.encoded / timings["encode_corpus_s"]
    _check_finite(docs, "documents")
    start = time.perf_counter()
    queries = embed(query_ids, [dataset.queries[i] for i in query_ids], "query", False).load()
    timings["encode_queries_s"] = time.perf_counter() - start
    _check_finite(queries, "queries")
    geometry = _retrieval_geometry(docs, queries, dataset, query_ids)
    normalize = model.config.normalize
    if normalize:
        queries = F.normalize(torch.from_numpy(queries), dim=-1).numpy()

    depth = max(ks) + (1 if ignore_identical_ids else 0)
    compressed = funnel is not None or quantization is not None
    metrics: dict[str, float] = {}
    full_run: Run = {}
    for dim in [None, *matryoshka_dims]:
        # The ordinary search moves under flat/ when a compressed one takes its keys.
        prefix = "flat/" if dim is None and compressed else ""
        start = time.perf_counter()
        run, search_s = _search_run(docs, queries, dim, normalize, index, depth, query_ids)
        run = _drop_identical(run, ignore_identical_ids)
        timings[prefix + metric_key("search_s", dim, model.dim)] = time.perf_counter() - start
        if prefix:
            timings["flat/search_ms_per_query"] = 1000 * search_s / len(query_ids)
        for name, value in retrieval_metrics(run, dataset.qrels, ks).items():
            metrics[prefix + metric_key(name, dim, model.dim)] = value
        if dim is None:
            full_run = run
    if compressed:
        # Both need the whole matrix: a funnel re-ranks from it, quantisation rescores.
        doc_matrix = torch.from_numpy(np.array(docs.load()))
        if normalize:
            doc_matrix = F.normalize(doc_matrix, dim=-1)
        scores, ids, extra = _compressed_search(
            doc_matrix,
            torch.from_numpy(queries),
            depth,
            normalize,
            index,
            funnel,
            quantization,
            timings,
        )
        timings["search_ms_per_query"] = 1000 * timings["search_s"] / len(query_ids)
        full_run = _drop_identical(to_run(scores, ids, query_ids, doc_ids), ignore_identical_ids)
        # The compressed search's metrics lead metrics.json and the table: they are the run's.
        metrics = retrieval_metrics(full_run, dataset.qrels, ks) | extra | metrics
    return RetrievalResult(metrics | geometry, full_run, timings)


def _compressed_search(
    docs: torch.Tensor,
    queries: torch.Tensor,
    depth: int,
    normalize: bool,
    index: IndexSpec,
    funnel: FunnelConfig | None,
    quantization: QuantizationConfig | None,
    timings: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The funnel's or the quantised index's ``(scores, ids)`` and its size metrics;
    ``index_build_s`` and ``search_s`` (the search alone) go into ``timings``."""
    start = time.perf_counter()
    extra = {}
    if funnel is not None:
        first = funnel_index(docs, funnel, normalize=normalize, index=index)
        timings["index_build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        scores, ids = funnel_search(
            first, docs, queries, funnel, depth, normalize=normalize, index=index
        )
    else:
        quantized = QuantizedIndex(docs, quantization.kind)
        timings["index_build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        scores, ids = quantized_search(quantized, docs, queries, depth, quantization.rescore)
        extra = {
            "bytes_per_doc": quantized.bytes_per_doc,
            "flat/bytes_per_doc": docs.shape[1] * 4,  # float32
        }
    timings["search_s"] = time.perf_counter() - start
    return scores, ids, extra


def _drop_identical(run: Run, ignore_identical_ids: bool) -> Run:
    if not ignore_identical_ids:
        return run
    return {q: {d: s for d, s in hits.items() if d != q} for q, hits in run.items()}


def _check_matryoshka_dims(dims: Sequence[int], width: int) -> None:
    # Truncation would refuse them only after the whole encode.
    bad = [dim for dim in dims if not 0 < dim <= width]
    if bad:
        raise ValueError(f"matryoshka_dims: {bad} outside the model's (0, {width}] dimensions")


def _check_finite(embeddings: Embeddings | np.ndarray, what: str) -> None:
    # FAISS and the correlations take NaN without complaint and score it as garbage (a NaN
    # model scored nDCG 0.0); this names the cause instead.
    shards = (
        [embeddings]
        if isinstance(embeddings, np.ndarray)
        else (shard for _, shard in embeddings.shards())
    )
    bad = sum(int((~np.isfinite(shard).all(axis=-1)).sum()) for shard in shards)
    if bad:
        raise ValueError(
            f"{bad} of {len(embeddings)} {what} have non-finite embeddings (NaN or inf): the "
            "model's weights are probably NaN or inf (e.g. diverged training)"
        )


def _retrieval_geometry(
    docs: Embeddings,
    queries: np.ndarray,
    dataset: BeirDataset,
    query_ids: list[str],
) -> dict[str, float]:
    doc_row = {d: i for i, d in enumerate(docs.ids)}
    query_row = {q: i for i, q in enumerate(query_ids)}
    pairs = [
        (query_row[q], doc_row[d])
        for q, judged in dataset.qrels.items()
        if q in query_row
        for d, relevance in judged.items()
        if relevance > 0 and d in doc_row
    ]
    q_rows = np.array([q for q, _ in pairs], dtype=np.int64)
    d_rows = np.array([d for _, d in pairs], dtype=np.int64)
    # uniformity's own draw, made here so that only the drawn documents are read.
    drawn = np.arange(len(docs))
    if len(docs) > UNIFORMITY_POINTS:
        generator = torch.Generator().manual_seed(0)
        drawn = torch.randperm(len(docs), generator=generator)[:UNIFORMITY_POINTS].numpy()
    norms = [np.linalg.norm(shard.astype(np.float64), axis=-1) for _, shard in docs.shards()]
    norms.append(np.linalg.norm(queries.astype(np.float64), axis=-1))
    metrics = geometry_metrics(
        torch.from_numpy(queries[q_rows]),
        torch.from_numpy(docs.rows(d_rows)),
        torch.from_numpy(docs.rows(drawn)),
        max_points=UNIFORMITY_POINTS,
    )
    return metrics | norm_summary(torch.from_numpy(np.concatenate(norms)))


def _search_run(
    docs: Embeddings,
    queries: np.ndarray,
    dim: int | None,
    normalize: bool,
    spec: IndexSpec,
    depth: int,
    query_ids: list[str],
) -> tuple[Run, float]:
    """The run and the seconds its search took (indexing included: a store is indexed
    shard by shard as it is searched). ``queries`` come normalised when ``normalize``."""

    def transform(x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(x, dtype=np.float32))
        if normalize:
            x = F.normalize(x, dim=-1)
        return truncate_embeddings(x, dim, normalize).numpy()

    query_vectors = truncate_embeddings(torch.from_numpy(queries), dim, normalize).numpy()
    start = time.perf_counter()
    scores, ids = search_embeddings(
        docs,
        np.ascontiguousarray(query_vectors),
        depth,
        factory=spec.factory,
        metric=spec.metric,
        use_gpu=spec.use_gpu,
        train_size=spec.train_size,
        nprobe=spec.nprobe,
        ef_search=spec.ef_search,
        transform=transform,
    )
    search_s = time.perf_counter() - start
    return to_run(scores, ids, query_ids, docs.ids), search_s


def evaluate_sts(
    model: BiEncoder,
    pairs: Sequence[ScoredPair],
    *,
    matryoshka_dims: Sequence[int] = (),
    batch_size: int = 64,
    positive_threshold: float = 4.0,
) -> dict[str, float]:
    """Spearman and Pearson correlation between cosine similarity and gold scores.

    Both sentences are embedded with the query tower: STS pairs are symmetric. Geometry
    metrics: ``alignment`` over the pairs whose gold score is at least
    ``positive_threshold`` (4 of STS-B's 0-5: paraphrases), ``uniformity`` and norms over
    the sentences of both columns.

    Raises ValueError before encoding for Matryoshka dims beyond the model's, and after
    encoding for non-finite embeddings.
    """
    _check_matryoshka_dims(matryoshka_dims, model.dim)
    left = model.encode(
        [p.text1 for p in pairs], kind="query", batch_size=batch_size, normalize=False
    )
    right = model.encode(
        [p.text2 for p in pairs], kind="query", batch_size=batch_size, normalize=False
    )
    _check_finite(torch.cat([left, right]).numpy(), "sentences")
    gold = np.array([p.score for p in pairs])
    positive = torch.as_tensor(gold >= positive_threshold)
    geometry = geometry_metrics(left[positive], right[positive], torch.cat([left, right]))
    if model.config.normalize:
        left, right = F.normalize(left, dim=-1), F.normalize(right, dim=-1)
    metrics = {}
    for dim in [None, *matryoshka_dims]:
        a = truncate_embeddings(left, dim, normalize=False)
        b = truncate_embeddings(right, dim, normalize=False)
        cosine = F.cosine_similarity(a, b, dim=-1).numpy()
        for name, value in sts_metrics(cosine, gold).items():
            metrics[metric_key(name, dim, model.dim)] = value
    return metrics | geometry
