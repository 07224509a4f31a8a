"""IR metrics against pytrec_eval (the trec_eval C code) plus hand-computed cases."""

from __future__ import annotations

import math
import random

import pytest

from biencoder.evaluation.metrics import (
    METRIC_FAMILIES,
    per_query_metrics,
    retrieval_metrics,
    trec_order,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

TREC_NAMES = {
    "ndcg": "ndcg_cut_{}",
    "map": "map_cut_{}",
    "recall": "recall_{}",
    "precision": "P_{}",
}


def _reference_top(docs, k):
    """Top k in trec_eval order, written independently of ``trec_order``."""
    return dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])


def _oracle(run, qrels, ks, relevance_threshold=1):
    """Per-query metrics from pytrec_eval under our key names; mrr@k via a truncated run."""
    cuts = ",".join(str(k) for k in sorted(set(ks)))
    measures = {f"ndcg_cut.{cuts}", f"map_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}"}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_threshold)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=relevance_threshold)
    full = evaluator.evaluate(run)
    out = {qid: {} for qid in full}
    for k in ks:
        truncated = {qid: _reference_top(docs, k) for qid, docs in run.items()}
        rr_k = rr.evaluate(truncated)
        assert rr_k.keys() == full.keys()
        for qid, values in full.items():
            for family, trec_name in TREC_NAMES.items():
                out[qid][f"{family}@{k}"] = values[trec_name.format(k)]
            out[qid][f"mrr@{k}"] = rr_k[qid]["recip_rank"]
    return out


def _random_case(rng: random.Random):
    # Ids of varying length so that string order differs from numeric order.
    pool = [f"d{rng.randrange(1000)}" for _ in range(rng.randint(1, 40))]
    pool = list(dict.fromkeys(pool))
    discrete = rng.random() < 0.5  # few distinct scores -> many ties
    run, qrels = {}, {}
    for q in range(rng.randint(1, 8)):
        qid = f"q{q}"
        where = rng.random()
        if where > 0.1:  # 10% of queries only in qrels
            depth = rng.randint(0, len(pool))
            run[qid] = {
                doc: (rng.randrange(4) / 4 if discrete else rng.uniform(-1, 1))
                for doc in rng.sample(pool, depth)
            }
        if where < 0.9 or q == 0:  # some queries only in run
            judged = rng.sample(pool, rng.randint(0, len(pool)))
            # grades include negative and zero; some queries get no relevant doc at all
            grades = [-1, 0, 0] if rng.random() < 0.15 else [-1, 0, 0, 1, 1, 2, 3]
            qrels[qid] = {doc: rng.choice(grades) for doc in judged}
    return run, qrels


def _assert_match(run, qrels, ks, relevance_threshold=1):
    expected = _oracle(run, qrels, ks, relevance_threshold)
    got = per_query_metrics(run, qrels, ks, relevance_threshold=relevance_threshold)
    assert got.keys() == expected.keys()
    for qid in expected:
        assert got[qid].keys() == expected[qid].keys()
        for name, value in expected[qid].items():
            assert got[qid][name] == pytest.approx(value, abs=1e-6), (qid, name)
    if expected:
        means = retrieval_metrics(run, qrels, ks, relevance_threshold=relevance_threshold)
        for name in means:
            oracle_mean = sum(m[name] for m in expected.values()) / len(expected)
            assert means[name] == pytest.approx(oracle_mean, abs=1e-6), name


@pytest.mark.parametrize("seed", range(300))
def test_matches_pytrec_eval_on_random_runs(seed):
    rng = random.Random(seed)
    run, qrels = _random_case(rng)
    ks = rng.choice([(1, 3, 5, 10, 100), (2, 7), (1, 50), (4,)])
    _assert_match(run, qrels, ks, relevance_threshold=1 if seed % 3 else 2)


def test_tie_break_matches_pytrec_eval():
    # All scores tie, so the order is entirely trec_eval's doc id tie-break.
    docs = ["9", "10", "a", "A", "ab", "b", "é", "z", "€"]
    for relevant in docs:
        run = {"q": dict.fromkeys(docs, 1.0)}
        qrels = {"q": {relevant: 1}}
        _assert_match(run, qrels, (1, 2, 5, 10))


def test_trec_order_sorts_score_then_doc_id_descending():
    ranked = trec_order({"a": 1.0, "b": 2.0, "c": 1.0, "10": 1.0, "9": 1.0})
    assert [doc for doc, _ in ranked] == ["b", "c", "a", "9", "10"]
    assert [doc for doc, _ in trec_order({"a": 1.0, "b": 2.0, "c": 1.0}, depth=2)] == ["b", "c"]


@pytest.mark.parametrize("seed", range(20))
def test_trec_order_depth_is_a_prefix_of_the_full_order(seed):
    rng = random.Random(seed)
    docs = {f"d{i}": rng.randrange(5) / 4 for i in range(rng.randint(1, 60))}
    full = trec_order(docs)
    assert full == list(_reference_top(docs, len(docs)).items())
    for depth in (1, 2, 5, 30, 100):
        assert trec_order(docs, depth=depth) == full[:depth]


def test_hand_computed_graded_case():
    # Ranking: z (grade -1), then the 0.5 tie as c (2), b (0), a (1), then d (unjudged).
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.1, "z": 0.9}}
    qrels = {"q": {"a": 1, "b": 0, "c": 2, "z": -1}}
    m = per_query_metrics(run, qrels, ks=(1, 3, 5))["q"]
    idcg3 = 2 + 1 / math.log2(3)
    assert m["ndcg@1"] == 0.0
    assert m["ndcg@3"] == pytest.approx((2 / math.log2(3)) / idcg3)
    assert m["ndcg@5"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(5)) / idcg3)
    assert m["mrr@1"] == 0.0
    assert m["mrr@3"] == 0.5
    assert m["recall@3"] == 0.5
    assert m["recall@5"] == 1.0
    assert m["precision@3"] == pytest.approx(1 / 3)
    assert m["precision@5"] == pytest.approx(2 / 5)
    assert m["map@3"] == pytest.approx((1 / 2) / 2)
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_hand_computed_mean_and_query_selection():
    run = {
        "hit": {"r": 2.0, "x": 1.0},
        "miss": {"x": 2.0, "r": 1.0},
        "no_relevant": {"x": 1.0},  # judged, but nothing relevant: scored 0
        "empty": {},  # in the run with no documents: scored 0
        "unjudged": {"r": 1.0},  # not in qrels: skipped
    }
    qrels = {
        "hit": {"r": 1},
        "miss": {"r": 1},
        "no_relevant": {"x": 0},
        "empty": {"r": 1},
        "not_run": {"r": 1},  # not in the run: skipped, as pytrec_eval and BEIR do
    }
    per_query = per_query_metrics(run, qrels, ks=(1, 2))
    assert set(per_query) == {"hit", "miss", "no_relevant", "empty"}
    assert all(v == 0.0 for q in ("no_relevant", "empty") for v in per_query[q].values())
    means = retrieval_metrics(run, qrels, ks=(1, 2))
    assert means["mrr@1"] == pytest.approx(1 / 4)
    assert means["mrr@2"] == pytest.approx((1 + 1 / 2) / 4)
    assert means["recall@2"] == pytest.approx(2 / 4)
    assert means["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 4)
    assert list(means) == [f"{f}@{k}" for f in METRIC_FAMILIES for k in (1, 2)]
    _assert_match(run, qrels, (1, 2))


def test_relevance_threshold_does_not_change_ndcg_gains():
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"a": 1, "b": 2, "c": 3}}
    strict = per_query_metrics(run, qrels, ks=(1,), relevance_threshold=2)["q"]
    assert strict["ndcg@1"] == pytest.approx(1 / 3)  # grade-1 doc still gains 1
    assert strict["mrr@1"] == 0.0  # but it is not relevant at threshold 2
    _assert_match(run, qrels, (1, 2, 3), relevance_threshold=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": ()}, "ks must not be empty"),
        ({"ks": (0, 5)}, "positive integer"),
        ({"ks": (2.5,)}, "positive integer"),
        ({"relevance_threshold": 0}, "relevance_threshold"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics({"q": {"a": 1.0}}, {"q": {"a": 1}}, **kwargs)


def test_nothing_to_evaluate_raises():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        retrieval_metrics({"q": {"a": 1.0}}, {"other": {"a": 1}})
