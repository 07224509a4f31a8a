"""Nearest-neighbour search over document embeddings with FAISS."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np

from evaluation.metrics import Run

logger = logging.getLogger(__name__)

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    # FAISS needs C-contiguous float32 rows; converting here saves every caller from doing it.
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {matrix.shape}")
    return matrix


def _to_gpu(index: faiss.Index, factory: str, requested: bool) -> faiss.Index:
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        logger.warning("keeping index %r on CPU: faiss has no GPU implementation of HNSW", factory)
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as err:
        if requested:
            raise ValueError(f"faiss cannot put index {factory!r} on GPU: {err}") from err
        logger.warning("keeping index %r on CPU: faiss cannot put it on GPU (%s)", factory, err)
        return index


def build_index(
    embeddings: np.ndarray,
    factory: str = "Flat",
    *,
    metric: str = "ip",
    use_gpu: bool | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> faiss.Index:
    """Build a FAISS index over ``embeddings`` and add them (row ``i`` gets id ``i``).

    Args:
        embeddings: ``[n, dim]`` document embeddings; converted to C-contiguous float32. For
            cosine similarity, L2-normalise them and use ``metric="ip"``.
        factory: a ``faiss.index_factory`` string, e.g. ``"Flat"`` (exact), ``"IVF256,Flat"``,
            ``"HNSW32"``, ``"IVF256,PQ16"``.
        metric: ``"ip"`` (inner product) or ``"l2"`` (squared Euclidean distance).
        use_gpu: ``None`` uses all GPUs when faiss sees any; ``True`` requires a GPU. HNSW has no
            GPU implementation and always stays on CPU (a warning is logged).
        train_size: for indexes that need training (IVF, PQ, ...), train on this many rows drawn
            at random (``seed``) instead of on all of them.
        seed: seed of the training subset draw.

    Returns:
        The trained index holding all ``n`` vectors.

    Raises:
        ValueError: bad factory string or metric, or an index that cannot be built or trained.
        RuntimeError: ``use_gpu=True`` but faiss sees no GPU.
    """
    x = _as_matrix(embeddings, "embeddings")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    try:
        index = faiss.index_factory(x.shape[1], factory, _METRICS[metric])
    except RuntimeError as err:
        raise ValueError(
            f"faiss cannot build index factory string {factory!r} for dim {x.shape[1]}: {err}"
        ) from err

    num_gpus = faiss.get_num_gpus()
    if use_gpu and num_gpus == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (is this a faiss-cpu build?)")
    if use_gpu or (use_gpu is None and num_gpus > 0):
        # Moved before training so that IVF k-means runs on the GPU too.
        index = _to_gpu(index, factory, requested=bool(use_gpu))

    if not index.is_trained:
        train = x
        if train_size is not None:
            if train_size < 1:
                raise ValueError(f"train_size must be positive, got {train_size}")
            if train_size < len(x):
                rows = np.random.default_rng(seed).choice(len(x), size=train_size, replace=False)
                train = x[np.sort(rows)]
        try:
            index.train(train)
        except RuntimeError as err:
            raise ValueError(f"training index {factory!r} on {len(train)} vectors: {err}") from err
    index.add(x)
    return index


def _set_search_parameter(index: faiss.Index, name: str, value: int) -> None:
    # GpuParameterSpace (faiss-gpu builds only) also handles GPU indexes and replicas.
    space = (
        faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    )
    try:
        space.set_index_parameter(index, name, value)
    except RuntimeError as err:
        raise ValueError(
            f"cannot set {name}={value} on {type(index).__name__}: not a parameter of this index"
        ) from err


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    batch_size: int = 4096,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` search of ``queries`` in ``index``, in batches of ``batch_size`` queries.

    Args:
        index: from ``build_index`` (or any FAISS index).
        queries: ``[Q, dim]`` query embeddings; converted to C-contiguous float32.
        k: neighbours per query; clipped to the number of vectors in the index.
        batch_size: queries per ``index.search`` call, to bound temporary memory.
        nprobe: IVF lists visited per query. Set on the index, so it stays for later searches.
        ef_search: HNSW search breadth ``efSearch``. Also stays set on the index.

    Returns:
        ``(scores, ids)``, both ``[Q, min(k, ntotal)]``, best first. ``scores`` (float32) are
        higher-is-better: inner products for an ``ip`` index, negated squared L2 distances for
        an ``l2`` one. ``ids`` (int64) are row numbers of the indexed embeddings, ``-1`` where an
        approximate index found fewer than ``k`` neighbours.
    """
    q = _as_matrix(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dim {q.shape[1]} but the index has dim {index.d}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if index.ntotal == 0:
        raise ValueError("the index holds no vectors")
    if nprobe is not None:
        _set_search_parameter(index, "nprobe", nprobe)
    if ef_search is not None:
        _set_search_parameter(index, "efSearch", ef_search)

    k = min(k, index.ntotal)
    scores = np.empty((len(q), k), dtype=np.float32)
    ids = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        stop = start + batch_size
        scores[start:stop], ids[start:stop] = index.search(q[start:stop], k)
    if index.metric_type == faiss.METRIC_L2:
        np.negative(scores, out=scores)
    return scores, ids


def to_run(
    scores: np.ndarray,
    ids: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
) -> Run:
    """Turn ``search`` output into a run: query id -> document id -> score.

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
