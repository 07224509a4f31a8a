"""eval.py end to end on small real data, checked against independent oracles."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval
from scipy import stats

from data import SCIFACT_DIR, STSB_DIR, load_beir, load_sts
from evaluation import read_trec_run
from model import BiEncoder, packaged_model_path

ROOT = Path(__file__).resolve().parents[1]


def run_eval(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory) -> Path:
    """30 SciFact test queries with their relevant docs plus 300 distractors."""
    full = load_beir(SCIFACT_DIR, "test")
    query_ids = sorted(full.qrels)[:30]
    keep = {d for q in query_ids for d in full.qrels[q]} | set(list(full.corpus)[:300])
    folder = tmp_path_factory.mktemp("beir")
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id in sorted(keep):
            doc = full.corpus[doc_id]
            f.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for q in query_ids:
            f.write(json.dumps({"_id": q, "text": full.queries[q]}) + "\n")
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in query_ids:
            for d, rel in full.qrels[q].items():
                f.write(f"{q}\t{d}\t{rel}\n")
    return folder


def test_retrieval_metrics_and_run_file_agree_with_pytrec_eval(small_beir, tmp_path):
    out = tmp_path / "run"
    proc = run_eval(f"data.path={small_beir}", f"hydra.run.dir={out}", "matryoshka_dims=[128]")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    run = read_trec_run(out / "run.trec")
    qrels = load_beir(small_beir, "test").qrels
    assert set(run) == set(qrels) and all(len(hits) == 100 for hits in run.values())

    measures = {"ndcg_cut.10", "recall.100", "map_cut.100", "P.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for ours, theirs in [("ndcg@10", "ndcg_cut_10"), ("recall@100", "recall_100"),
                         ("map@100", "map_cut_100"), ("precision@10", "P_10")]:
        expected = sum(q[theirs] for q in per_query.values()) / len(per_query)
        assert metrics[ours] == pytest.approx(expected, abs=1e-6), ours
    assert metrics["ndcg@10"] > 0.5  # a real model on an easy subset, not noise
    assert 0 < metrics["dim128/ndcg@10"] <= 1
    assert (out / ".hydra" / "config.yaml").is_file()
    assert "ndcg" in proc.stdout


def test_sts_metrics_agree_with_scipy(tmp_path):
    pairs_file = tmp_path / "sts" / "sts-test.csv"
    pairs_file.parent.mkdir()
    with gzip.open(STSB_DIR / "sts-test.csv.gz", "rt", encoding="utf-8") as f:
        rows = f.read().splitlines()[:120]
    pairs_file.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    proc = run_eval("data=sts", f"data.path={pairs_file.parent}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())

    pairs = load_sts(pairs_file.parent, "test")
    model = BiEncoder.from_pretrained(packaged_model_path())
    a = model.encode([p.text1 for p in pairs])
    b = model.encode([p.text2 for p in pairs])
    cosine = (a * b).sum(-1).numpy()
    gold = [p.score for p in pairs]
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(cosine, gold)[0], abs=1e-6)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(cosine, gold)[0], abs=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [("ks=[0,10]", "ks must be positive"), ("batch_size=0", "batch_size must be positive"),
     ("model.pooling=avg", "unknown pooling 'avg'"), ("nonsense_key=1", "nonsense_key")],
)
def test_bad_values_fail_naming_the_key(override, message, tmp_path):
    proc = run_eval(override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr
