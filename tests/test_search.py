"""FAISS search against numpy brute force, IVF/HNSW parameters, GPU routing, to_run."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from tolerances import assert_same_neighbours, summation_tolerance

from biencoder.evaluation.metrics import to_run
from biencoder.retrieval.search import build_index, check_index_dims, search

DIM = 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((2000, DIM)).astype(np.float32)
    docs[1000:1010] = docs[:10]  # duplicate rows give exactly tied scores
    queries = rng.standard_normal((57, DIM)).astype(np.float32)
    queries[:10] = docs[:10] + 0.01 * rng.standard_normal((10, DIM)).astype(np.float32)
    return docs, queries


def _brute_force(docs, queries, k, metric="ip"):
    d, q = docs.astype(np.float64), queries.astype(np.float64)
    sims = q @ d.T if metric == "ip" else -((q[:, None, :] - d[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def _score_tolerance(docs, queries, metric="ip"):
    """How far two float32 searches' scores may differ: rounding in a DIM-term sum is
    relative to its terms, which Cauchy-Schwarz bounds by |q|·|d|; FAISS computes L2 as
    |q|² + |d|² - 2q·d, whose terms reach (|q| + |d|)²."""
    q = np.linalg.norm(queries, axis=1).max()
    d = np.linalg.norm(docs, axis=1).max()
    return summation_tolerance(DIM) * (q * d if metric == "ip" else (q + d) ** 2)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_brute_force(data, metric):
    docs, queries = data
    index = build_index(docs, "Flat", metric=metric)
    scores, ids = search(index, queries, k=10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(queries), 10)
    tol = _score_tolerance(docs, queries, metric)
    assert_same_neighbours(scores, ids, *_brute_force(docs, queries, 10, metric), tol)


def test_ties_are_really_present(data):
    docs, queries = data
    scores, ids = search(build_index(docs), queries[:10], k=2)
    np.testing.assert_array_equal(scores[:, 0], scores[:, 1])
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.c_[np.arange(10), np.arange(1000, 1010)])


def test_ivf_with_all_lists_probed_equals_flat(data):
    docs, queries = data
    flat_scores, flat_ids = search(build_index(docs), queries, k=20)
    ivf = build_index(docs, "IVF16,Flat", train_size=800)
    assert ivf.is_trained and ivf.ntotal == len(docs)
    scores, ids = search(ivf, queries, k=20, nprobe=16)
    assert faiss.extract_index_ivf(ivf).nprobe == 16
    tol = _score_tolerance(docs, queries)
    assert_same_neighbours(scores, ids, flat_scores, flat_ids, tol)
    # One probed list out of 16 misses neighbours; this shows nprobe matters.
    few_scores, _ = search(ivf, queries, k=20, nprobe=1)
    assert (few_scores < flat_scores - tol).any()


def test_train_subset_is_seeded(data):
    docs, queries = data
    results = [
        search(build_index(docs, "IVF16,Flat", train_size=700, seed=s), queries, k=5)[1]
        for s in (3, 3, 4)
    ]
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def test_hnsw_sets_ef_search_and_finds_neighbours(data):
    docs, queries = data
    index = build_index(docs, "HNSW32")
    _, ids = search(index, queries, k=10, ef_search=256)
    assert faiss.downcast_index(index).hnsw.efSearch == 256
    _, ref_ids = _brute_force(docs, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids, strict=True)])
    assert recall > 0.9


@pytest.mark.slow  # PQ training takes tens of seconds with faiss-cpu on 2 cores
def test_ivf_pq_builds_and_searches(data):
    docs, queries = data
    scores, ids = search(build_index(docs, "IVF16,PQ8", metric="l2"), queries, k=5, nprobe=4)
    assert ids.shape == (len(queries), 5) and (ids >= 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_input_conversion_batches_and_k_clipping(data):
    docs, queries = data
    index = build_index(docs[:, ::1].astype(np.float64))
    fortran_queries = np.asfortranarray(queries.astype(np.float64))
    scores, ids = search(index, fortran_queries, k=7, batch_size=5)
    ref_scores, ref_ids = search(index, queries, k=7)
    # The batch size can pick FAISS's kernel (BLAS or its own SIMD loop, by
    # distance_compute_blas_threshold) and so the order of the sums.
    assert_same_neighbours(scores, ids, ref_scores, ref_ids, _score_tolerance(docs, queries))
    small = build_index(docs[:4])
    scores, ids = search(small, queries, k=10)
    assert ids.shape == (len(queries), 4)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(4), (len(queries), 1)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d, q: build_index(d, "IVFbogus"), "'IVFbogus'"),
        (lambda d, q: build_index(d, "Flat", metric="cosine"), "metric"),
        (lambda d, q: build_index(d[0]), "2-D"),
        (lambda d, q: build_index(d, "IVF4096,Flat"), "training index 'IVF4096,Flat'"),
        (lambda d, q: search(build_index(d), q[:, :8], k=3), "dim 8"),
        (lambda d, q: search(build_index(d), q, k=0), "k must be positive"),
        (lambda d, q: search(build_index(d), q, k=3, nprobe=4), "nprobe"),
    ],
)
def test_bad_arguments(data, call, message):
    with pytest.raises(ValueError, match=message):
        call(*data)


@pytest.mark.parametrize(
    ("factory", "dims", "message"),
    [
        (
            "IVF256,PQ48",
            [384, 64, 100, 64],
            "factory: faiss cannot build index 'IVF256,PQ48' for embedding dims 64, 100: "
            "'!(d % M == 0)' failed: The dimension of the vector (d) should be a multiple of "
            "the number of subquantizers (M)",
        ),
        ("PQ5x4fs", [384], "'PQ5x4fs' for embedding dim 384: '!(d % M == 0)' failed"),
        ("OPQ16,IVF16,PQ16", [100], "'OPQ16,IVF16,PQ16' for embedding dim 100: "),
        ("PCA128,Flat", [384, 64], "'PCA128,Flat' for embedding dim 64: PCA cannot output 128"),
        ("IVFbogus", [32], "dim 32: could not parse index string IVFbogus"),
    ],
)
def test_check_index_dims_names_factory_and_refused_dims(factory, dims, message):
    with pytest.raises(ValueError) as err:
        check_index_dims(factory, dims)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("factory", "needed"),
    [
        ("IVF16,Flat", 16),
        ("IVF32,SQ8", 32),
        ("PQ4x4", 16),
        ("IVF8,PQ4", 256),
        ("IVF32,PQ4x4fs", 32),
        ("OPQ4_32,IVF8,PQ4x4", 256),
        ("HNSW32,PQ4x4", 16),
        ("IVF16,PQ4x4,RFlat", 16),
    ],
)
def test_check_index_dims_knows_the_rows_faiss_needs_to_train(data, factory, needed):
    docs, _ = data
    check_index_dims(factory, [DIM, DIM // 2], train_rows=needed)
    with pytest.raises(ValueError, match=f"into {needed} centroids .* on {needed - 1} "):
        check_index_dims(factory, [DIM], train_rows=needed - 1)
    with pytest.raises(ValueError, match="training index"):
        build_index(docs[: needed - 1], factory)
    # 8-bit codebooks (256 centroids) train for seconds on 2 cores; a refusal is instant.
    if needed < 256:
        build_index(docs[:needed], factory)


def test_check_index_dims_accepts_what_builds(data):
    docs = data[0][:300]
    for factory, dims in (("IVF8,PQ4x4", [32, 8]), ("PCA16,Flat", [32, 16]), ("HNSW8", [5])):
        check_index_dims(factory, dims, metric="l2", train_rows=len(docs))
        for dim in dims:
            build_index(docs[:, :dim], factory, metric="l2")
    with pytest.raises(ValueError, match="metric"):
        check_index_dims("Flat", [DIM], metric="cosine")


def test_to_run_drops_missing_neighbours():
    scores = np.array([[0.9, 0.5, -3e38], [0.7, 0.2, 0.1]], dtype=np.float32)
    ids = np.array([[2, 0, -1], [1, 2, 0]])
    run = to_run(scores, ids, ["qa", "qb"], ["d0", "d1", "d2"])
    assert run == {
        "qa": {"d2": pytest.approx(0.9), "d0": pytest.approx(0.5)},
        "qb": {"d1": pytest.approx(0.7), "d2": pytest.approx(0.2), "d0": pytest.approx(0.1)},
    }
    assert all(type(s) is float for docs in run.values() for s in docs.values())
    with pytest.raises(ValueError, match="query ids"):
        to_run(scores, ids, ["qa"], ["d0", "d1", "d2"])
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        to_run(scores, ids, ["qa", "qb"], ["d0", "d1"])


def test_to_run_from_search_ranks_like_search(data):
    docs, queries = data
    scores, ids = search(build_index(docs), queries, k=10)
    run = to_run(
        scores, ids, [f"q{i}" for i in range(len(queries))], [f"d{i}" for i in range(2000)]
    )
    assert len(run) == len(queries) and all(len(d) == 10 for d in run.values())
    assert run["q20"] == {f"d{i}": float(s) for i, s in zip(ids[20], scores[20], strict=True)}


def test_gpu_routing_without_a_gpu(data, monkeypatch, caplog):
    docs, _ = data
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index)
    build_index(docs, "Flat")
    assert len(moved) == 1
    build_index(docs, "Flat", use_gpu=False)
    assert len(moved) == 1
    with caplog.at_level(logging.WARNING, logger="biencoder.retrieval.search"):
        build_index(docs[:100], "HNSW32", use_gpu=True)
    assert len(moved) == 1
    assert "no GPU implementation of HNSW" in caplog.text

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="no GPU"):
        build_index(docs, "Flat", use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU")
def test_gpu_flat_and_ivf_equal_cpu_flat(data):
    docs, queries = data
    cpu_scores, cpu_ids = search(build_index(docs, use_gpu=False), queries, k=10)
    for factory, nprobe in (("Flat", None), ("IVF16,Flat", 16)):
        index = build_index(docs, factory, use_gpu=True)
        scores, ids = search(index, queries, k=10, nprobe=nprobe)
        assert_same_neighbours(scores, ids, cpu_scores, cpu_ids, _score_tolerance(docs, queries))
