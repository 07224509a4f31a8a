"""TREC run/qrels files: round trips, trec_eval ordering, and pytrec_eval's own parsers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.evaluation.trec import (
    read_trec_qrels,
    read_trec_run,
    write_trec_qrels,
    write_trec_run,
)

pytrec_eval = pytest.importorskip("pytrec_eval")


def _random_run(seed: int):
    rng = random.Random(seed)
    run = {
        f"q{q}": {f"d{rng.randrange(500)}": rng.uniform(-5, 5) for _ in range(rng.randint(1, 30))}
        for q in range(20)
    }
    run["ties"] = dict.fromkeys(["9", "10", "b", "a"], 0.5)
    run["numpy"] = {"x": np.float32(0.1), "y": np.float64(1e-300)}
    qrels = {
        qid: {doc: rng.choice([-1, 0, 1, 2]) for doc in docs if rng.random() < 0.5}
        for qid, docs in run.items()
    }
    return run, qrels


def test_run_round_trip_is_exact(tmp_path):
    run, _ = _random_run(0)
    path = tmp_path / "run.trec"
    write_trec_run(run, path, tag="mine")
    back = read_trec_run(path)
    assert back == {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    with open(path) as f:
        assert pytrec_eval.parse_run(f) == back


def test_run_file_lines_are_in_trec_eval_order(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run({"q": {"a": 0.5, "b": 0.5, "10": 0.5, "9": 0.5, "top": 2.0}}, path, depth=4)
    lines = path.read_text().splitlines()
    assert lines == [
        "q Q0 top 1 2.0 biencoder",
        "q Q0 b 2 0.5 biencoder",
        "q Q0 a 3 0.5 biencoder",
        "q Q0 9 4 0.5 biencoder",
    ]


def test_depth_cut_file_evaluates_like_the_full_run_at_that_depth(tmp_path):
    run, qrels = _random_run(1)
    path = tmp_path / "run.trec"
    write_trec_run(run, path, depth=5)
    # approx: the file holds queries in sorted order, so the mean sums in another order
    expected = retrieval_metrics(run, qrels, ks=(1, 5))
    assert retrieval_metrics(read_trec_run(path), qrels, ks=(1, 5)) == pytest.approx(expected)


def test_qrels_round_trip(tmp_path):
    _, qrels = _random_run(2)
    qrels = {qid: docs for qid, docs in qrels.items() if docs}
    path = tmp_path / "qrels.txt"
    write_trec_qrels(qrels, path)
    assert read_trec_qrels(path) == qrels
    with open(path) as f:
        assert pytrec_eval.parse_qrel(f) == qrels


@pytest.mark.parametrize(
    ("run", "kwargs"),
    [
        ({"q 1": {"a": 1.0}}, {}),
        ({"q": {"a\tb": 1.0}}, {}),
        ({"q": {"a": 1.0}}, {"tag": "two words"}),
        ({"q": {"a": 1.0}}, {"depth": 0}),
    ],
)
def test_write_run_rejects_bad_input(tmp_path, run, kwargs):
    with pytest.raises(ValueError):
        write_trec_run(run, tmp_path / "run.trec", **kwargs)


@pytest.mark.parametrize(
    "text",
    ["q Q0 a 1 0.5\n", "q Q0 a 1 high tag\n", "q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n"],
)
def test_read_run_rejects_malformed_files(tmp_path, text):
    path = tmp_path / "run.trec"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"run\.trec:\d+: "):
        read_trec_run(path)
