"""eval.py on small real data, checked against independent oracles.

One test runs the real command line; the others compose the same config in-process,
which skips re-importing torch for every case.
"""

import gzip
import json
from pathlib import Path

import pytest
import pytrec_eval
import torch
from configs import compose_config, run_entry
from hydra.errors import ConfigCompositionException
from scipy import stats

from biencoder import eval as eval_cli
from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR, STSB_DIR
from biencoder.data.sts import load_sts
from biencoder.evaluation.config import EvalConfig
from biencoder.evaluation.trec import read_trec_run
from biencoder.training.hydra_config import ConfigError


def compose_eval(*overrides: str):
    return compose_config("eval", *overrides)


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


def test_command_line_metrics_and_run_file_agree_with_pytrec_eval(small_beir, tmp_path):
    out = tmp_path / "run"
    proc = run_entry(
        "eval.py",
        f"eval_data.path={small_beir}",
        f"hydra.run.dir={out}",
        "evaluation.matryoshka_dims=[128]",
        "model.max_length=128",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    run = read_trec_run(out / "run.trec")
    qrels = load_beir(small_beir, "test").qrels
    assert set(run) == set(qrels) and all(len(hits) == 100 for hits in run.values())

    measures = {"ndcg_cut.10", "recall.100", "map_cut.100", "P.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for ours, theirs in [
        ("ndcg@10", "ndcg_cut_10"),
        ("recall@100", "recall_100"),
        ("map@100", "map_cut_100"),
        ("precision@10", "P_10"),
    ]:
        expected = sum(q[theirs] for q in per_query.values()) / len(per_query)
        assert metrics[ours] == pytest.approx(expected, abs=1e-6), ours
    assert metrics["ndcg@10"] > 0.5  # a real model on an easy subset, not noise
    assert 0 < metrics["dim128/ndcg@10"] <= 1
    assert (out / ".hydra" / "config.yaml").is_file()
    assert "ndcg" in proc.stdout


def test_sts_metrics_agree_with_scipy(tmp_path, minilm):
    folder = tmp_path / "sts"
    folder.mkdir()
    with gzip.open(STSB_DIR / "sts-test.csv.gz", "rt", encoding="utf-8") as f:
        rows = f.read().splitlines()[:120]
    (folder / "sts-test.csv").write_text("\n".join(rows) + "\n")
    metrics = eval_cli.evaluate(minilm, load_sts(folder, "test"), EvalConfig(), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)

    pairs = load_sts(folder, "test")
    cosine = minilm.encode([p.text1 for p in pairs]) * minilm.encode([p.text2 for p in pairs])
    cosine = cosine.sum(-1).numpy()
    gold = [p.score for p in pairs]
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(cosine, gold)[0], abs=1e-6)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(cosine, gold)[0], abs=1e-6)


def test_default_config_is_minilm_on_bundled_scifact_test():
    cfg = compose_eval()
    assert Path(cfg.model.path, "model.safetensors").is_file()
    assert Path(cfg.eval_data.path) == SCIFACT_DIR and cfg.eval_data.split == "test"
    assert cfg.evaluation.index.factory == "Flat"
    assert list(cfg.evaluation.ks) == [1, 3, 5, 10, 100]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluation.ks=[0,10]", "evaluation.ks: cut-offs must be positive"),
        ("evaluation.batch_size=0", "evaluation.batch_size: must be positive"),
        ("evaluation.matryoshka_dims=[-4]", "evaluation.matryoshka_dims: must be positive"),
        ("evaluation.matryoshka_dims=[512]", "evaluation.matryoshka_dims: .* exceed .* 384"),
        ("evaluation/index=hnsw evaluation.index.ef_search=0", "evaluation.index.ef_search"),
        ("model.pooling=avg", "model.pooling: unknown pooling 'avg'"),
        ("model.max_length=0", "model.max_length: must be positive or null"),
        ("eval_data.corpus_size=-1", "eval_data.corpus_size: must be positive or null"),
        pytest.param(
            "device=cuda:3",
            "device: 'cuda:3' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        eval_cli.run(compose_eval(*override.split()), tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_keys_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="nonsense_key"):
        compose_eval("nonsense_key=1")
    with pytest.raises(ConfigCompositionException, match=r"evaluation\.batch_size"):
        compose_eval("evaluation.batch_size=many")
