"""Quantised document embeddings (``eval.py quantization=int8|binary``), checked against
int8 and binary search computed by hand in numpy on a toy corpus of 20 documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from configs import compose_config, run_entry
from test_funnel import DIM, N_DOCS, FakeModel, toy_dataset, toy_embeddings

from biencoder import eval as eval_cli
from biencoder.evaluation.compressed import QuantizedIndex, quantized_search
from biencoder.evaluation.config import QuantizationConfig
from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.evaluation.retrieval import evaluate_retrieval
from biencoder.model.config import EncoderConfig
from biencoder.training.hydra_config import ConfigError

KS = (1, 3, 5, 20)  # 20: every document is ranked, so ties cannot change which are kept


def int8_by_hand(docs: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Scores [Q, N]: each dimension's corpus min..max cut into 255 steps, a document value
    coded as the step it falls in (256 levels, the max alone in the last), decoded to the
    middle of its step and multiplied with the float query."""
    x, q = docs.numpy().astype(np.float64), queries.numpy().astype(np.float64)
    low, span = x.min(axis=0), x.max(axis=0) - x.min(axis=0)
    codes = np.floor(255 * (x - low) / span)
    assert codes.min() == 0 and codes.max() == 255
    return q @ (low + (codes + 0.5) / 255 * span).T


def binary_by_hand(docs: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Scores [Q, N]: dim minus twice the Hamming distance of the sign bits."""
    d_bits, q_bits = docs.numpy() > 0, queries.numpy() > 0
    hamming = (q_bits[:, None, :] != d_bits[None, :, :]).sum(axis=-1)
    return docs.shape[1] - 2 * hamming


BY_HAND = {"int8": int8_by_hand, "binary": binary_by_hand}


@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_scores_match_the_quantisation_by_hand(kind):
    docs, queries = toy_embeddings()
    expected = BY_HAND[kind](docs, queries)
    scores, ids = QuantizedIndex(docs, kind).search(queries, N_DOCS)
    assert sorted(ids[0]) == list(range(N_DOCS))
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, axis=1), atol=1e-5)
    np.testing.assert_allclose(scores, -np.sort(-expected, axis=1), atol=1e-5)  # best first


@pytest.mark.parametrize(("kind", "bytes_per_doc"), [("int8", 64), ("binary", 8)])
def test_bytes_per_doc(kind, bytes_per_doc):
    docs = torch.randn(N_DOCS, 64)
    assert QuantizedIndex(docs, kind).bytes_per_doc == bytes_per_doc


def test_int8_differs_from_float_search():
    docs, queries = toy_embeddings()
    scores, _ = QuantizedIndex(docs, "int8").search(queries, N_DOCS)
    exact = -np.sort(-(queries @ docs.T).numpy(), axis=1)
    assert not np.allclose(scores, exact, atol=1e-5)


def test_rescoring_reranks_the_binary_candidates_with_float_embeddings():
    docs, queries = toy_embeddings()
    index = QuantizedIndex(docs, "binary")
    exact = (queries @ docs.T).numpy()
    exact_top3 = np.argsort(-exact, axis=1, kind="stable")[:, :3]
    _, ids = quantized_search(index, docs, queries, 3, rescore=N_DOCS)
    np.testing.assert_array_equal(ids, exact_top3)
    # Rescoring only the Hamming top 3 would not find them all.
    _, ids = quantized_search(index, docs, queries, 3, rescore=None)
    assert (np.sort(ids, axis=1) != np.sort(exact_top3, axis=1)).any()

    scores, ids = quantized_search(index, docs, queries, 3, rescore=6)
    hamming_scores = binary_by_hand(docs, queries)
    sixth_best = -np.sort(-hamming_scores, axis=1)[:, 5:6]
    # Each kept document is among the six best by Hamming (ties at the sixth included)...
    assert (np.take_along_axis(hamming_scores, ids, axis=1) >= sixth_best).all()
    # ...and they come ranked by their float scores.
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_evaluation_metrics_match_the_quantisation_by_hand(kind):
    docs, queries = toy_embeddings()
    dataset = toy_dataset()
    result = evaluate_retrieval(
        FakeModel(docs, queries),
        dataset,
        ks=KS,
        quantization=QuantizationConfig(kind=kind),
    )
    expected_scores = BY_HAND[kind](docs, queries)
    run = {
        f"q{q}": {f"d{d}": float(s) for d, s in enumerate(row)}
        for q, row in enumerate(expected_scores)
    }
    expected = retrieval_metrics(run, dataset.qrels, KS)
    assert {k: result.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    flat = retrieval_metrics(
        {
            f"q{q}": {f"d{d}": float(s) for d, s in enumerate(row)}
            for q, row in enumerate((queries @ docs.T).numpy())
        },
        dataset.qrels,
        KS,
    )
    assert {k: result.metrics[f"flat/{k}"] for k in flat} == pytest.approx(flat, abs=1e-12)
    assert result.metrics["bytes_per_doc"] == {"int8": DIM, "binary": DIM // 8}[kind]
    assert result.metrics["flat/bytes_per_doc"] == 4 * DIM
    assert result.timings["search_ms_per_query"] > 0


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantization.kind=int4", "quantization.kind: must be one of none, int8, binary"),
        ("quantization=binary quantization.rescore=10", r"quantization.rescore: must be at least"),
        ("quantization=binary quantization.rescore=0", "quantization.rescore: must be positive"),
        ("quantization.rescore=100", "quantization.rescore: only applies to"),
        ("quantization=int8 evaluation/index=hnsw", "quantization.kind: .* must be Flat"),
        ("quantization=binary evaluation.index.metric=l2", "quantization.kind: .* metric ip"),
        ("quantization=binary model.projection_dim=60", "quantization.kind: binary codes need"),
        ("quantization=binary eval_data=sts", "quantization: searches a corpus"),
    ],
)
def test_bad_quantization_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        eval_cli.run(compose_config("eval", *override.split()), tmp_path)
    assert not any(tmp_path.iterdir())


def test_quantization_is_none_by_default_and_rescoring_off():
    cfg = compose_config("eval")
    assert cfg.quantization.kind == "none"
    assert compose_config("eval", "quantization=binary").quantization.rescore is None


# ------------------------------------------------------------------ command line


def test_binary_command_line_writes_metrics(tiny_model_path, tiny_beir_path, tmp_path):
    out = tmp_path / "run"
    run_entry(
        "eval.py",
        "quantization=binary",
        f"hydra.run.dir={out}",
        f"model.path={tiny_model_path}",
        f"eval_data.path={tiny_beir_path}",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ndcg@10", "recall@100", "search_ms_per_query", "flat/ndcg@10"):
        assert key in metrics, key
    assert metrics["bytes_per_doc"] == EncoderConfig.tiny().hidden_size // 8
