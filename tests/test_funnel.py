"""Matryoshka funnel search (``eval.py funnel.dim=D funnel.candidates=C``), checked against
exact search and against the funnel computed by hand in numpy on a toy corpus."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from configs import compose_config, run_entry
from omegaconf import OmegaConf

from biencoder import eval as eval_cli
from biencoder.data.beir import BeirDataset, Document
from biencoder.evaluation.compressed import funnel_index, funnel_search
from biencoder.evaluation.config import FunnelConfig, IndexSpec, QuantizationConfig
from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.evaluation.retrieval import evaluate_retrieval
from biencoder.evaluation.trec import read_trec_run
from biencoder.retrieval.search import build_index, search
from biencoder.training.hydra_config import ConfigError

N_DOCS, N_QUERIES, DIM = 20, 6, 8


def toy_embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm documents and queries, [20, 8] and [6, 8]."""
    generator = torch.Generator().manual_seed(seed)
    docs = torch.randn(N_DOCS, DIM, generator=generator)
    queries = torch.randn(N_QUERIES, DIM, generator=generator)
    return F.normalize(docs, dim=-1), F.normalize(queries, dim=-1)


class FakeModel:
    """What ``evaluate_retrieval`` uses of a BiEncoder, returning fixed embeddings per text."""

    def __init__(self, docs: torch.Tensor, queries: torch.Tensor, normalize: bool = True):
        self.rows = {f"d{i}": row for i, row in enumerate(docs)}
        self.rows |= {f"q{i}": row for i, row in enumerate(queries)}
        self.dim = docs.shape[1]
        self.config = SimpleNamespace(normalize=normalize)

    def encode(self, texts, *, kind, batch_size, normalize, show_progress=False):
        return torch.stack([self.rows[text] for text in texts])


def toy_dataset() -> BeirDataset:
    """Query i judges documents 2i (grade 2) and 3i+1 (grade 1); the texts are the ids."""
    corpus = {f"d{i}": Document(f"d{i}", "", f"d{i}") for i in range(N_DOCS)}
    queries = {f"q{i}": f"q{i}" for i in range(N_QUERIES)}
    qrels = {f"q{i}": {f"d{2 * i}": 2, f"d{3 * i + 1}": 1} for i in range(N_QUERIES)}
    return BeirDataset(corpus, queries, qrels, "test", Path("toy"), {})


def by_hand(docs, queries, dim: int, candidates: int, k: int):
    """The funnel in numpy: top ``candidates`` by re-normalised truncation, then the best
    ``k`` of them by full-dimension inner product."""
    docs, queries = docs.numpy().astype(np.float64), queries.numpy().astype(np.float64)
    low_d = docs[:, :dim] / np.linalg.norm(docs[:, :dim], axis=1, keepdims=True)
    low_q = queries[:, :dim] / np.linalg.norm(queries[:, :dim], axis=1, keepdims=True)
    kept = np.argsort(-(low_q @ low_d.T), axis=1, kind="stable")[:, :candidates]
    full = np.take_along_axis(queries @ docs.T, kept, axis=1)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, axis=1), np.take_along_axis(kept, order, axis=1)


def run_funnel(docs, queries, dim, candidates, k, index: IndexSpec | None = None):
    index = index or IndexSpec()
    funnel = FunnelConfig(dim=dim, candidates=candidates)
    first = funnel_index(docs, funnel, normalize=True, index=index)
    return funnel_search(first, docs, queries, funnel, k, normalize=True, index=index)


def test_all_candidates_is_exact_full_dimension_search():
    docs, queries = toy_embeddings()
    flat_scores, flat_ids = search(build_index(docs.numpy()), queries.numpy(), N_DOCS)
    scores, ids = run_funnel(docs, queries, dim=2, candidates=N_DOCS, k=N_DOCS)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(scores, flat_scores, atol=1e-6)


def test_few_candidates_match_the_funnel_by_hand_and_lose_some_of_the_exact_top():
    docs, queries = toy_embeddings()
    scores, ids = run_funnel(docs, queries, dim=2, candidates=5, k=3)
    expected_scores, expected_ids = by_hand(docs, queries, dim=2, candidates=5, k=3)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    # The test would pass for exact search too if the first stage lost nothing.
    _, exact_ids = by_hand(docs, queries, dim=DIM, candidates=N_DOCS, k=3)
    assert (ids != exact_ids).any()


def test_l2_metric_reranks_by_full_dimension_distance():
    docs, queries = toy_embeddings()
    scores, ids = run_funnel(docs, queries, 3, N_DOCS, N_DOCS, IndexSpec(metric="l2"))
    distances = torch.cdist(queries.double(), docs.double()).square().numpy()
    np.testing.assert_array_equal(ids, np.argsort(distances, axis=1, kind="stable"))
    np.testing.assert_allclose(-scores, np.take_along_axis(distances, ids, axis=1), atol=1e-5)


def evaluate_toy(ks=(1, 3, 5, 10), **kwargs):
    docs, queries = toy_embeddings()
    return evaluate_retrieval(FakeModel(docs, queries), toy_dataset(), ks=ks, **kwargs)


def test_evaluation_reports_the_funnel_and_flat_search_of_the_same_run():
    exact = evaluate_toy(funnel=FunnelConfig(dim=2, candidates=N_DOCS))
    flat = {k.removeprefix("flat/"): v for k, v in exact.metrics.items() if k.startswith("flat/")}
    assert flat.keys() >= {"ndcg@10", "recall@10"}
    assert {k: exact.metrics[k] for k in flat} == flat
    assert exact.timings["search_ms_per_query"] > 0
    assert exact.timings["flat/search_ms_per_query"] > 0

    narrow = evaluate_toy(funnel=FunnelConfig(dim=2, candidates=10))
    expected_scores, expected_ids = by_hand(*toy_embeddings(), dim=2, candidates=10, k=10)
    run = {
        f"q{q}": {f"d{d}": s for d, s in zip(ids, scores, strict=True)}
        for q, (ids, scores) in enumerate(zip(expected_ids, expected_scores, strict=True))
    }
    assert narrow.run.keys() == run.keys()
    for q, hits in run.items():
        assert list(narrow.run[q]) == list(hits)
    expected = retrieval_metrics(run, toy_dataset().qrels, (1, 3, 5, 10))
    assert {k: narrow.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert narrow.metrics["ndcg@10"] != narrow.metrics["flat/ndcg@10"]


def test_no_funnel_leaves_the_ordinary_keys():
    metrics = evaluate_toy(funnel=FunnelConfig()).metrics
    assert "ndcg@10" in metrics and not any(k.startswith("flat/") for k in metrics)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("funnel.dim=384", "funnel.dim: must be below the model's 384 dimensions"),
        ("funnel.dim=0", "funnel.dim: must be positive or null"),
        ("funnel.dim=64 funnel.candidates=50", r"funnel.candidates: must be at least max\("),
        ("funnel.dim=64 funnel.candidates=0", "funnel.candidates: must be positive"),
        ("funnel.dim=64 quantization=int8", "funnel.dim: cannot be combined with quantization"),
        ("funnel.dim=64 eval_data=sts", "funnel.dim: searches a corpus"),
        (
            "funnel.dim=60 evaluation.index.factory=PQ16",
            "funnel.dim: evaluation.index cannot search it",
        ),
    ],
)
def test_bad_funnel_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        eval_cli.run(compose_config("eval", *override.split()), tmp_path)
    assert not any(tmp_path.iterdir())


def test_funnel_is_off_by_default_and_typed():
    cfg = compose_config("eval")
    assert cfg.funnel.dim is None
    assert OmegaConf.get_type(cfg.funnel) is FunnelConfig
    assert OmegaConf.get_type(cfg.quantization) is QuantizationConfig


# --------------------------------------------- every eval-only key changes the output
# tests/test_knobs.py enumerates train.py's nodes; funnel and quantization exist in eval.py
# only, so their keys are enumerated and probed here the same way.

TINY_KS = "evaluation.ks=[1,5,10]"
PROBES = {
    "funnel.dim": (("funnel.dim=16", "funnel.candidates=10"), ("funnel.dim=4",)),
    "funnel.candidates": (("funnel.dim=4", "funnel.candidates=10"), ("funnel.candidates=40",)),
    "quantization.kind": (("quantization=int8",), ("quantization.kind=binary",)),
    "quantization.rescore": (("quantization=binary",), ("quantization.rescore=20",)),
}


def _leaf_keys(node, prefix: str) -> list[str]:
    return [f"{prefix}.{key}" for key in node]


def test_every_eval_only_key_has_a_probe():
    cfg = compose_config("eval")
    assert set(_leaf_keys(cfg.funnel, "funnel") + _leaf_keys(cfg.quantization, "quantization")) == (
        PROBES.keys()
    )


@pytest.mark.parametrize("key", sorted(PROBES))
def test_changing_an_eval_only_key_changes_the_run(key, tiny_model_path, tiny_beir_path, tmp_path):
    base, change = PROBES[key]
    common = (f"model.path={tiny_model_path}", f"eval_data.path={tiny_beir_path}", TINY_KS)
    runs = []
    for name, overrides in [("base", base), ("changed", base + change)]:
        out = tmp_path / name
        out.mkdir()
        eval_cli.run(compose_config("eval", *common, *overrides), out)
        runs.append(read_trec_run(out / "run.trec"))
    assert runs[0] != runs[1]


# ------------------------------------------------------------------ command line


def test_funnel_command_line_writes_metrics(minilm_path, tiny_beir_path, tmp_path):
    out = tmp_path / "run"
    run_entry(
        "eval.py",
        "funnel.dim=64",
        "funnel.candidates=100",
        f"hydra.run.dir={out}",
        f"eval_data.path={tiny_beir_path}",
        "model.max_length=64",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ndcg@10", "recall@100", "search_ms_per_query", "flat/ndcg@10"):
        assert key in metrics, key
    assert 0 < metrics["ndcg@10"] <= 1
    assert metrics["flat/search_ms_per_query"] > 0
