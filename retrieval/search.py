"""Nearest-neighbour search over document embeddings with FAISS.

Exact search (``Flat``) on a machine with CUDA but a FAISS build without GPU support runs
on the GPU anyway, as a blocked matmul and top-k in torch (:class:`TorchFlatIndex`), so
evaluation and dense mining never fall back to searching on the CPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import faiss
import numpy as np
import torch

from biencoder.runtime.device import matmul_precision

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


class TorchFlatIndex:
    """Exact search as FAISS's ``IndexFlat`` does it, with torch on any device.

    The corpus lives on ``device``; each query batch is scored against ``block_rows`` documents
    at a time and the running top-k merged, so temporary memory is O(queries × block_rows)
    whatever the corpus size. Scores follow FAISS's conventions: inner products for ``ip``,
    squared L2 distances (lower is better) for ``l2``. Only the attributes and methods that
    :func:`search` uses exist.
    """

    is_trained = True

    def __init__(
        self, embeddings: np.ndarray, metric: str, device: torch.device, block_rows: int = 65536
    ) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.metric_type = _METRICS[metric]
        self.device = torch.device(device)
        self.block_rows = block_rows
        self.docs = torch.from_numpy(_as_matrix(embeddings, "embeddings")).to(self.device)
        self.d = self.docs.shape[1]
        self.ntotal = self.docs.shape[0]
        self._squared_norms = self.docs.square().sum(dim=1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(_as_matrix(queries, "queries")).to(self.device)
        l2 = self.metric_type == faiss.METRIC_L2
        # FP32 throughout: TF32 matmuls would move scores by ~1e-3 and reorder neighbours.
        best_scores = torch.full((len(q), 0), float("-inf"), device=self.device)
        best_ids = torch.empty((len(q), 0), dtype=torch.int64, device=self.device)
        with torch.inference_mode(), matmul_precision(tf32=False):
            for start in range(0, self.ntotal, self.block_rows):
                block = self.docs[start : start + self.block_rows]
                scores = q @ block.T  # [Q, rows]
                if l2:
                    # Higher is better while merging; negated back to distances at the end.
                    norms = self._squared_norms[start : start + self.block_rows]
                    scores = 2 * scores - norms - q.square().sum(dim=1, keepdim=True)
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                merged = torch.cat([best_scores, top.values], dim=1)
                merged_ids = torch.cat([best_ids, top.indices + start], dim=1)
                best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
                best_ids = merged_ids.gather(1, order)
        if l2:
            best_scores = -best_scores
        return best_scores.cpu().numpy(), best_ids.cpu().numpy()


def _exact_search_device() -> torch.device | None:
    """The device :class:`TorchFlatIndex` searches on when FAISS has no GPU: CUDA if any."""
    return torch.device("cuda") if torch.cuda.is_available() else None


def _faiss_reason(err: RuntimeError) -> str:
    # FAISS prefixes its reason with the C++ function, file and line.
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(err).strip())


def _min_train_rows(index: faiss.Index) -> int:
    """Rows that training ``index`` needs: FAISS's k-means refuses fewer rows than centroids,
    and an index clusters its training rows into its IVF lists, its PQ codebooks and its OPQ
    rotation's codebooks. Other trained parts (RQ, LSQ, ...) are not inspected; they fail at
    training as before."""
    needed = []
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            transform = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                # Without a PQ of its own, OPQ trains one of 8 bits (faiss's OPQMatrix::train).
                needed.append(transform.pq.ksub if transform.pq is not None else 256)
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needed.append(ivf.nlist)
        inner = faiss.downcast_index(ivf)
    if getattr(inner, "pq", None) is not None:
        needed.append(inner.pq.ksub)
    return max(needed, default=0)


def _pca_refusal(index: faiss.Index) -> str | None:
    # index_factory accepts a PCA to more dims than its input; training then fails.
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexPreTransform):
        return None
    for i in range(inner.chain.size()):
        transform = faiss.downcast_VectorTransform(inner.chain.at(i))
        if isinstance(transform, faiss.PCAMatrix) and transform.d_out > transform.d_in:
            return f"PCA cannot output {transform.d_out} dims from {transform.d_in}"
    return None


def check_index_dims(
    factory: str,
    dims: Sequence[int],
    *,
    metric: str = "ip",
    train_rows: int | None = None,
) -> None:
    """Raise a ValueError, before any data exists, where ``build_index(embeddings, factory,
    metric=metric)`` would fail for embeddings of one of ``dims`` dimensions (e.g. a PQ with
    48 sub-quantisers needs a dim divisible by 48) or for ``train_rows`` training rows (an
    IVF with 256 lists needs at least 256). FAISS builds each empty index to decide, which
    takes milliseconds; call this before encoding anything.

    ``train_rows``: the rows the index would be trained on (``train_size``, or the corpus
    size when smaller); None skips that check. The CPU index is checked: a GPU may refuse
    more.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    refused: dict[str, list[int]] = {}
    needed = 0
    for dim in dict.fromkeys(dims):
        try:
            index = faiss.index_factory(dim, factory, _METRICS[metric])
        except RuntimeError as err:
            refused.setdefault(_faiss_reason(err), []).append(dim)
            continue
        reason = _pca_refusal(index)
        if reason is not None:
            refused.setdefault(reason, []).append(dim)
        needed = max(needed, _min_train_rows(index))
    if refused:
        reasons = "; ".join(
            f"dim{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: {reason}"
            for reason, bad in refused.items()
        )
        raise ValueError(f"factory: faiss cannot build index {factory!r} for embedding {reasons}")
    if train_rows is not None and train_rows < needed:
        raise ValueError(
            f"train_size: index {factory!r} clusters its training rows into {needed} "
            f"centroids (IVF lists or PQ codes) and needs at least that many rows, but would "
            f"be trained on {train_rows} (train_size, or the corpus when smaller)"
        )


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
            GPU implementation and always stays on CPU (a warning is logged). Where faiss has
            no GPU support but torch sees CUDA, exact search (``"Flat"``) returns a
            :class:`TorchFlatIndex` on the GPU unless ``use_gpu=False``.
        train_size: for indexes that need training (IVF, PQ, ...), train on this many rows drawn
            at random (``seed``) instead of on all of them.
        seed: seed of the training subset draw.

    Returns:
        The trained index holding all ``n`` vectors (a FAISS index or a TorchFlatIndex).

    Raises:
        ValueError: bad factory string or metric, or an index that cannot be built or trained.
        RuntimeError: ``use_gpu=True`` but no GPU can run this index.
    """
    x = _as_matrix(embeddings, "embeddings")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    if faiss.get_num_gpus() == 0 and use_gpu is not False and factory == "Flat":
        device = _exact_search_device()
        if device is not None:
            logger.info(
                "exact search on %s with torch: this faiss build has no GPU support", device
            )
            return TorchFlatIndex(x, metric, device)
    train = x
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train_size must be positive, got {train_size}")
        if train_size < len(x):
            rows = np.random.default_rng(seed).choice(len(x), size=train_size, replace=False)
            train = x[np.sort(rows)]
    index = train_index(train, factory, metric=metric, use_gpu=use_gpu)
    index.add(x)
    return index


def train_index(
    train: np.ndarray,
    factory: str = "Flat",
    *,
    metric: str = "ip",
    use_gpu: bool | None = None,
) -> faiss.Index:
    """An empty FAISS index of ``factory``, trained on ``train`` where it needs training, to
    be filled with ``index.add``: how :func:`build_index` makes its index, and how a store
    too large for memory is indexed shard by shard. ``use_gpu`` as in ``build_index``
    (without its torch fallback: this is a FAISS index).
    """
    train = _as_matrix(train, "training rows")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    try:
        index = faiss.index_factory(train.shape[1], factory, _METRICS[metric])
    except RuntimeError as err:
        raise ValueError(
            f"faiss cannot build index factory string {factory!r} for dim {train.shape[1]}: {err}"
        ) from err
    num_gpus = faiss.get_num_gpus()
    if use_gpu and num_gpus == 0:
        raise RuntimeError(
            f"use_gpu=True but faiss sees no GPU: {factory!r} needs a faiss GPU build "
            "(pip install -e '.[gpu]'); without one only exact search ('Flat') runs on a GPU, "
            "through torch"
        )
    if use_gpu or (use_gpu is None and num_gpus > 0):
        # Moved before training so that IVF k-means runs on the GPU too.
        index = _to_gpu(index, factory, requested=bool(use_gpu))
    if not index.is_trained:
        try:
            index.train(train)
        except RuntimeError as err:
            raise ValueError(f"training index {factory!r} on {len(train)} vectors: {err}") from err
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
