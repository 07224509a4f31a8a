"""The embedding store as the entry points use it: eval.py and train.py's final evaluation
find what an earlier evaluation encoded, and encode again when anything differs.

The oracle for "found" is the encoder itself: a spy counts the document texts the towers
are handed, so a test fails if a store hit still encodes, or a miss does not.
"""

import json

import numpy as np
import pytest
from configs import compose_config, compose_train

from biencoder import eval as eval_cli
from biencoder import train as train_cli
from biencoder.data.beir import load_beir
from biencoder.evaluation.retrieval import evaluate_retrieval
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.store import weights_fingerprint


@pytest.fixture
def encoded(monkeypatch):
    """The number of texts ``BiEncoder.encode`` was asked for, by kind."""
    counts = {"doc": 0, "query": 0}
    encode = BiEncoder.encode

    def counting(self, texts, kind="query", *args, **kwargs):
        counts[kind] += len(texts)
        return encode(self, texts, kind, *args, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", counting)
    return counts


def _eval(tmp_path, name, model_path, beir_path, *overrides):
    cfg = compose_config(
        "eval", f"model.path={model_path}", f"eval_data.path={beir_path}", *overrides
    )
    out = tmp_path / name
    out.mkdir()
    return eval_cli.run(cfg, out)


def test_eval_py_reuses_a_store_across_index_types(
    tmp_path, tiny_model_path, tiny_beir_path, encoded
):
    corpus = len(load_beir(tiny_beir_path, "test").corpus)
    flat = _eval(tmp_path, "flat", tiny_model_path, tiny_beir_path)
    assert encoded["doc"] == corpus and flat["docs_encoded"] == corpus
    store = f"evaluation.store={tmp_path / 'flat' / 'embeddings'}"
    again = _eval(tmp_path, "again", tiny_model_path, tiny_beir_path, store)
    hnsw = _eval(tmp_path, "hnsw", tiny_model_path, tiny_beir_path, store, "evaluation/index=hnsw")
    binary = _eval(
        tmp_path, "binary", tiny_model_path, tiny_beir_path, store, "quantization=binary"
    )
    assert encoded["doc"] == corpus, "a store hit encoded the corpus again"
    assert again["docs_encoded"] == hnsw["docs_encoded"] == binary["docs_encoded"] == 0
    assert again["ndcg@10"] == flat["ndcg@10"]
    assert binary["flat/ndcg@10"] == flat["ndcg@10"]
    # Without evaluation.store, a new run folder has no embeddings yet.
    _eval(tmp_path, "fresh", tiny_model_path, tiny_beir_path)
    assert encoded["doc"] == 2 * corpus


def test_eval_py_encodes_again_when_the_settings_differ(
    tmp_path, tiny_model_path, tiny_beir_path, encoded
):
    corpus = len(load_beir(tiny_beir_path, "test").corpus)
    _eval(tmp_path, "a", tiny_model_path, tiny_beir_path)
    store = f"evaluation.store={tmp_path / 'a' / 'embeddings'}"
    shorter = _eval(tmp_path, "b", tiny_model_path, tiny_beir_path, store, "model.max_length=16")
    assert shorter["docs_encoded"] == corpus and encoded["doc"] == 2 * corpus


def test_train_py_final_evaluation_reuses_the_best_dev_corpus(tmp_path, tiny_run, encoded):
    # dev queries search the whole tiny corpus, which test shares: the final evaluation of
    # best finds the corpus its dev evaluation wrote.
    cfg = compose_train(*tiny_run("beir", "trainer.max_steps=3", "trainer.eval_every=1"))
    final = train_cli.train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["docs_encoded"] == 0 and "ndcg@10" in final
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dev = [line for line in lines if "dev/docs_encoded" in line]
    corpus = dev[0]["dev/docs_encoded"]
    assert len(dev) == 3 and all(line["dev/docs_encoded"] == corpus > 0 for line in dev)
    assert encoded["doc"] == 3 * corpus, "the final evaluation encoded the corpus"
    # Earlier dev evaluations' entries are deleted, but the best's and the latest's.
    manifests = [
        json.loads(path.read_text())
        for path in (tmp_path / "embeddings").glob("doc-*/manifest.json")
    ]
    assert 1 <= len(manifests) <= 2
    best = BiEncoder.from_pretrained(tmp_path / "checkpoints" / "best")
    assert weights_fingerprint(best) in {m["model"] for m in manifests}


def test_train_py_prunes_dev_entries_in_the_store_it_writes(tmp_path, tiny_run, encoded):
    # With evaluation.store set, dev evaluations write there, and pruning must look there
    # too: pruning the run folder's embeddings/ left every dev evaluation's corpus behind.
    store = tmp_path / "shared_store"
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_train(
        *tiny_run("beir", "trainer.max_steps=4", "trainer.eval_every=1"),
        f"evaluation.store={store}",
    )
    train_cli.train(cfg, run)
    assert not (run / "embeddings").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("dev/docs_encoded" in line for line in lines) == 4
    assert 1 <= len(list(store.glob("doc-*/manifest.json"))) <= 2


@pytest.mark.parametrize("shard_rows", [7, 10_000])
def test_store_backed_evaluation_equals_in_memory(
    tmp_path, tiny_model_path, tiny_beir_path, shard_rows
):
    model = BiEncoder.from_pretrained(tiny_model_path)
    dataset = load_beir(tiny_beir_path, "test")
    options = dict(matryoshka_dims=[8])
    memory = evaluate_retrieval(model, dataset, **options)
    stored = evaluate_retrieval(
        model, dataset, store=tmp_path / "store", shard_rows=shard_rows, **options
    )
    keys = [k for k in memory.metrics if not k.endswith("_s")]
    for key in keys:
        assert stored.metrics[key] == pytest.approx(memory.metrics[key], rel=1e-5, abs=1e-6), key
    assert stored.run.keys() == memory.run.keys()
    for query, hits in memory.run.items():
        assert list(stored.run[query]) == list(hits)
        np.testing.assert_allclose(list(stored.run[query].values()), list(hits.values()), rtol=1e-5)
