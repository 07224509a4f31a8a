"""data/bundled/tiny (what debug=tiny trains on) is a faithful slice of the bundled sets."""

import gzip
import subprocess
import sys

from configs import ROOT

from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR, STSB_DIR, TINY_DIR
from biencoder.data.sts import load_sts


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
