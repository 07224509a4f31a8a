"""data/bundled/tiny (what debug=tiny trains on) is a faithful slice of the bundled sets."""

import gzip
import subprocess
import sys

from configs import ROOT, compose_train

from biencoder import train as train_cli
from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR, STSB_DIR, TINY_DIR
from biencoder.data.sts import load_sts

SCIFACT = str(SCIFACT_DIR)


def test_tiny_beir_is_a_slice_of_scifact():
    for split, queries in (("train", 100), ("test", 10)):
        tiny, full = load_beir(TINY_DIR, split, strict=True), load_beir(SCIFACT_DIR, split)
        assert len(tiny.qrels) == queries
        for query_id, judged in tiny.qrels.items():
            assert judged == full.qrels[query_id]
            assert tiny.queries[query_id] == full.queries[query_id]
            assert set(judged) <= set(tiny.corpus)
        assert all(tiny.corpus[d] == full.corpus[d] for d in tiny.corpus)
    # The default dev split (80 queries held out) leaves queries to train on.
    assert len(load_beir(TINY_DIR, "train").qrels) > 80


def test_tiny_sts_is_the_head_of_each_split():
    for split in ("train", "dev", "test"):
        assert (
            load_sts(TINY_DIR, split) == load_sts(STSB_DIR, split)[: len(load_sts(TINY_DIR, split))]
        )
        assert len(load_sts(TINY_DIR, split)) >= 39


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_make_tiny_rebuilds_the_same_bytes(tmp_path):
    subprocess.run(
        [sys.executable, "data/bundled/make_tiny.py", str(tmp_path)], cwd=ROOT, check=True
    )
    rebuilt = _files(tmp_path)
    assert rebuilt == _files(TINY_DIR)
    assert all(gzip.decompress(b) for name, b in rebuilt.items() if name.suffix == ".gz")


def test_debug_tiny_shrinks_every_training_set_option_and_the_sets_of_multi():
    tiny = str(TINY_DIR)
    cfg = compose_train(
        "debug=tiny",
        "train_data=multi",
        "+train_data@train_data.sets.beir=scifact",
        "+train_data@train_data.sets.sts=sts",
        "+train_data@train_data.sets.synthetic=synthetic",
    )
    sets = cfg.train_data.sets
    assert sets.beir.path == sets.sts.path == sets.synthetic.synthesis.corpus.path == tiny
    for overrides in (["debug=tiny"], ["debug=tiny", "experiment=sts"]):
        assert compose_train(*overrides).train_data.path == tiny
    spec = train_cli.build_training_spec(
        compose_train("debug=tiny", "train_data=synthetic").train_data
    )
    synthesis = spec.synthesis
    assert synthesis.corpus.path == tiny
    sizes = (synthesis.num_docs, synthesis.num_queries, synthesis.max_doc_words)
    assert (*sizes, synthesis.sampling.max_new_tokens) == (8, 2, 64, 24)
    # Without debug=tiny the options keep their own data; the command line beats debug=tiny.
    full = compose_train("train_data=synthetic").train_data.synthesis
    assert (full.corpus.path, full.num_docs, full.sampling.max_new_tokens) == (SCIFACT, 100, 40)
    assert compose_train("experiment=sts").train_data.path == str(STSB_DIR)
    assert compose_train("debug=tiny", "train_data.path=/elsewhere").train_data.path == "/elsewhere"
