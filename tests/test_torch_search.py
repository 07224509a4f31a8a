"""Exact search in torch (TorchFlatIndex), what build_index does on a GPU that faiss cannot
use, against FAISS's own IndexFlat on the CPU."""

from __future__ import annotations

import importlib

import faiss
import numpy as np
import pytest
import torch
from test_search import _brute_force, _score_tolerance, data  # noqa: F401
from tolerances import assert_same_neighbours

from biencoder.evaluation.metrics import to_run
from biencoder.retrieval.search import TorchFlatIndex, build_index, search

# The package exports a function named search, which hides the module of that name.
search_module = importlib.import_module("biencoder.retrieval.search")


def same_row(ids: np.ndarray) -> np.ndarray:
    """Ids with each duplicated document row (see test_search.data) named by its original."""
    return np.where((ids >= 1000) & (ids < 1010), ids - 1000, ids)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("k", [1, 10, 700])
def test_blocked_torch_search_equals_faiss_flat(data, metric, k):  # noqa: F811
    """Blocks of 300 rows (not a divisor of 2000, fewer than k=700) exercise the merge."""
    docs, queries = data
    faiss_scores, faiss_ids = search(build_index(docs, "Flat", metric=metric), queries, k=k)
    index = TorchFlatIndex(docs, metric, torch.device("cpu"), block_rows=300)
    scores, ids = search(index, queries, k=k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(queries), k)
    tol = _score_tolerance(docs, queries, metric)
    # Rows 1000-1009 repeat rows 0-9: at the k-th place either copy may be cut.
    assert_same_neighbours(scores, same_row(ids), faiss_scores, same_row(faiss_ids), tol)
    brute_scores, brute_ids = _brute_force(docs, queries, k, metric)
    assert_same_neighbours(scores, same_row(ids), brute_scores, same_row(brute_ids), tol)


def test_block_rows_changes_memory_not_results(data):  # noqa: F811
    docs, queries = data
    whole = search(TorchFlatIndex(docs, "ip", torch.device("cpu"), block_rows=5000), queries, 50)
    blocked = search(TorchFlatIndex(docs, "ip", torch.device("cpu"), block_rows=7), queries, 50)
    # Other block shapes round the dot products differently, in the last bits only.
    assert_same_neighbours(*blocked, *whole, _score_tolerance(docs, queries))
    with pytest.raises(ValueError, match="block_rows"):
        TorchFlatIndex(docs, "ip", torch.device("cpu"), block_rows=0)


def test_search_runs_in_full_fp32_and_restores_the_matmul_precision(data, monkeypatch):  # noqa: F811
    docs, queries = data
    seen = []
    matmul = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    torch.set_float32_matmul_precision("high")
    try:
        TorchFlatIndex(docs, "ip", torch.device("cpu"), block_rows=500).search(queries, 5)
        assert seen == ["highest"] * 4
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_build_index_searches_exact_indexes_with_torch_where_faiss_has_no_gpu(
    data,  # noqa: F811
    monkeypatch,
):
    docs, _ = data
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(search_module, "_exact_search_device", lambda: torch.device("cpu"))
    assert isinstance(build_index(docs, "Flat"), TorchFlatIndex)
    assert isinstance(build_index(docs, "Flat", use_gpu=True), TorchFlatIndex)
    # use_gpu=False keeps FAISS on the CPU; other indexes have no torch implementation.
    assert isinstance(build_index(docs, "Flat", use_gpu=False), faiss.Index)
    assert isinstance(build_index(docs, "IVF16,Flat"), faiss.Index)
    with pytest.raises(RuntimeError, match="'IVF16,Flat' needs a faiss GPU build"):
        build_index(docs, "IVF16,Flat", use_gpu=True)

    monkeypatch.setattr(search_module, "_exact_search_device", lambda: None)
    assert isinstance(build_index(docs, "Flat"), faiss.Index)
    with pytest.raises(RuntimeError, match="no GPU"):
        build_index(docs, "Flat", use_gpu=True)


def test_a_torch_index_gives_the_same_run(data, monkeypatch):  # noqa: F811
    docs, queries = data
    query_ids = [f"q{i}" for i in range(len(queries))]
    doc_ids = [f"d{i}" for i in range(len(docs))]
    expected = to_run(*search(build_index(docs, "Flat"), queries, 10), query_ids, doc_ids)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(search_module, "_exact_search_device", lambda: torch.device("cpu"))
    run = to_run(*search(build_index(docs, "Flat"), queries, 10), query_ids, doc_ids)
    assert run.keys() == expected.keys()
    for query in run:
        # Tied documents at the cut-off may differ; every shared one has the same score.
        common = set(run[query]) & set(expected[query])
        assert len(common) >= 9, query
        for doc in common:
            assert run[query][doc] == pytest.approx(expected[query][doc], abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_torch_search_equals_cpu_faiss(data, metric):  # noqa: F811
    docs, queries = data
    faiss_scores, faiss_ids = search(
        build_index(docs, "Flat", metric=metric, use_gpu=False), queries, 100
    )
    index = TorchFlatIndex(docs, metric, torch.device("cuda"), block_rows=300)
    scores, ids = search(index, queries, k=100)
    assert_same_neighbours(
        scores, ids, faiss_scores, faiss_ids, _score_tolerance(docs, queries, metric)
    )
