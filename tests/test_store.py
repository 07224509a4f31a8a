"""The embedding store (retrieval.store): an encode SIGKILLed and resumed ends with the bytes
of one that never stopped; any change to weights, texts, ids or encode settings names
another entry while a reloaded checkpoint finds its own; shard-by-shard search is the
in-memory search; DDP ranks write their own shards without gathering anything."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dist_worker
import numpy as np
import pytest
import torch
import torch.distributed as tdist
from tolerances import assert_same_neighbours, summation_tolerance

from biencoder.model.biencoder import BiEncoder, BiEncoderConfig
from biencoder.retrieval.search import build_index, search
from biencoder.retrieval.store import (
    MANIFEST,
    Embeddings,
    EmbeddingStore,
    InMemoryEmbeddings,
    Sharding,
    encode_to_store,
    entries_of,
    entry_key,
    entry_path,
    find,
    merge_top_k,
    search_embeddings,
    texts_fingerprint,
    weights_fingerprint,
)
from biencoder.runtime.device import bf16_supported
from biencoder.runtime.files import TMP_PREFIX


def _store_files(entry: Path) -> dict[str, bytes]:
    """Every file of a store entry but temporary litter, by name."""
    return {
        f.name: f.read_bytes()
        for f in sorted(entry.iterdir())
        if f.is_file() and not f.name.startswith(TMP_PREFIX)
    }


def _counted_encode(model, *args, **kwargs) -> tuple[EmbeddingStore, list[list[str]]]:
    """``encode_to_store(model, *args, **kwargs)`` and the chunks of texts it passed to
    ``model.encode``, in order (the chunks so far when it raises: see ``calls`` then). In
    one process, the store's ``encoded`` must count the texts encoded."""
    calls: list[list[str]] = []
    original = model.encode

    def encode(texts, *a, **k):
        calls.append(list(texts))
        return original(texts, *a, **k)

    model.encode = encode
    try:
        store = encode_to_store(model, *args, show_progress=False, **kwargs)
    finally:
        del model.encode
    sharding = kwargs.get("sharding")
    if sharding is None or sharding.world_size == 1:
        assert store.encoded == sum(map(len, calls)), f"encoded {store.encoded}"
    return store, calls


class TableModel(torch.nn.Module):
    """Stands in for a BiEncoder: the text ``row-<i>`` encodes to row ``i`` of a fixed
    table, which is the model's only buffer (so its weights fingerprint)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.asarray(table, dtype=np.float32)))
        self.config = BiEncoderConfig()
        self.precision = "fp32"

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def encode(self, texts, kind="query", batch_size=64, normalize=None, show_progress=None):
        return self.table[[int(t.removeprefix("row-")) for t in texts]].clone()


def _row_texts(count: int) -> tuple[list[str], list[str]]:
    return [f"id{i}" for i in range(count)], [f"row-{i}" for i in range(count)]


class ChunkedEmbeddings(Embeddings):
    """An array cut into shards at ``bounds`` (uneven sizes, shards of one row)."""

    def __init__(self, array: np.ndarray, bounds: list[int]) -> None:
        self.array, self.bounds = array, [0, *bounds, len(array)]
        self.ids, self.dim = [str(i) for i in range(len(array))], array.shape[1]

    def shards(self):
        for start, stop in zip(self.bounds, self.bounds[1:], strict=False):
            yield start, self.array[start:stop]


# ------------------------------------------------------------------- resume after SIGKILL

RESUME_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.store import encode_to_store
model_path, root, data = sys.argv[1:]
ids, texts = json.loads(open(data).read())
model = BiEncoder.from_pretrained(model_path)
encode_to_store(model, ids, texts, "doc", root, shard_rows=16, batch_size=8, show_progress=False)
"""


def _resume_texts() -> tuple[list[str], list[str]]:
    words = ["protein", "cell", "gene", "binding", "receptor", "tumour", "signal", "pathway"]
    texts = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) + f" {i}"
        for i in range(200)
    ]
    return [f"doc{i}" for i in range(200)], texts


def test_an_encode_killed_and_resumed_ends_with_the_bytes_of_one_that_never_stopped(
    tiny_model_path, tmp_path, one_thread
):
    ids, texts = _resume_texts()
    shard_count = 13  # 200 rows in shards of 16
    data = tmp_path / "texts.json"
    data.write_text(json.dumps([ids, texts]))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", RESUME_SCRIPT, tiny_model_path, str(killed), str(data)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 120
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if list(killed.glob("doc-*/shard-*.npy")):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait()
    log = (tmp_path / "stderr").read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {log}"
    # The entry and the lock beside it, which the killed process never released.
    (entry,) = (path for path in killed.glob("doc-*") if path.is_dir())
    assert (killed / f"{entry.name}.lock").exists()
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in entry.glob("shard-*.npy")}
    assert 1 <= len(before) < shard_count, sorted(before)
    assert not json.loads((entry / MANIFEST).read_text())["complete"]

    model = BiEncoder.from_pretrained(tiny_model_path)
    resumed, calls = _counted_encode(model, ids, texts, "doc", killed, shard_rows=16, batch_size=8)
    missing = [i for i in range(shard_count) if f"shard-{i:05d}.npy" not in before]
    # Only the missing shards were encoded, each from its own texts, and the shards already
    # written were left as they were.
    assert calls == [texts[16 * i : 16 * (i + 1)] for i in missing]
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in entry.glob("shard-*.npy")}
    assert {name: after[name] for name in before} == before
    assert resumed.path == entry and len(resumed) == 200 and resumed.ids == ids
    assert not (killed / f"{entry.name}.lock").exists()  # taken over, then released

    reference, reference_calls = _counted_encode(
        model, ids, texts, "doc", clean, shard_rows=16, batch_size=8
    )
    assert sum(map(len, reference_calls)) == 200
    assert reference.path.name == entry.name
    expected = _store_files(reference.path)
    assert len(expected) == shard_count + 2  # the shards, the manifest and the ids
    assert _store_files(entry) == expected
    # And the stored rows are the model's raw embeddings.
    raw = model.encode(texts, kind="doc", batch_size=8, normalize=False).numpy()
    np.testing.assert_allclose(resumed.load(), raw, rtol=0, atol=1e-5 * np.abs(raw).max())


def test_an_encode_that_raised_resumes_and_another_shard_size_encodes_everything(tmp_path):
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    model = TableModel(table)
    ids, texts = _row_texts(50)
    original, written = model.encode, []

    def failing(chunk, *args, **kwargs):
        if len(written) == 3:
            raise RuntimeError("out of memory")
        written.append(chunk)
        return original(chunk, *args, **kwargs)

    model.encode = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        encode_to_store(model, ids, texts, "doc", tmp_path / "a", shard_rows=7)
    del model.encode
    (entry,) = (path for path in (tmp_path / "a").glob("doc-*") if path.is_dir())
    assert sorted(f.name for f in entry.glob("shard-*")) == [
        f"shard-{i:05d}.npy" for i in (0, 1, 2)
    ]

    store, calls = _counted_encode(model, ids, texts, "doc", tmp_path / "a", shard_rows=7)
    assert calls == [texts[7 * i : 7 * (i + 1)] for i in range(3, 8)]
    fresh, _ = _counted_encode(model, ids, texts, "doc", tmp_path / "b", shard_rows=7)
    assert _store_files(store.path) == _store_files(fresh.path)
    np.testing.assert_array_equal(store.load(), table)

    # An incomplete entry written with other shard sizes keeps none of its shards: with 10
    # rows a shard, shard 1 holds rows 10-19, as many as shard 1 of 40 rows a shard
    # (rows 40-49), and shard 2 is past the last shard of 40.
    model.encode = failing
    written.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        encode_to_store(model, ids, texts, "doc", tmp_path / "c", shard_rows=10)
    del model.encode
    store, calls = _counted_encode(model, ids, texts, "doc", tmp_path / "c", shard_rows=40)
    assert calls == [texts[:40], texts[40:]]
    np.testing.assert_array_equal(store.load(), table)
    fresh, _ = _counted_encode(model, ids, texts, "doc", tmp_path / "d", shard_rows=40)
    assert _store_files(store.path) == _store_files(fresh.path)


def test_a_damaged_shard_of_an_incomplete_entry_is_encoded_again(tmp_path):
    table = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    model = TableModel(table)
    ids, texts = _row_texts(50)
    original = model.encode
    model.encode = lambda chunk, *a, **k: (
        original(chunk, *a, **k) if chunk[0] != "row-28" else 1 / 0
    )
    with pytest.raises(ZeroDivisionError):
        encode_to_store(model, ids, texts, "doc", tmp_path, shard_rows=7, show_progress=False)
    del model.encode
    (entry,) = (path for path in tmp_path.glob("doc-*") if path.is_dir())
    # Shards 0-3 written; 1 now holds too few rows and 2 is not an array at all.
    np.save(entry / "shard-00001.npy", table[7:10])
    (entry / "shard-00002.npy").write_bytes(b"not an array")
    store, calls = _counted_encode(model, ids, texts, "doc", tmp_path, shard_rows=7)
    assert calls == [texts[7 * i : 7 * (i + 1)] for i in (1, 2, 4, 5, 6, 7)]
    np.testing.assert_array_equal(store.load(), table)


# ------------------------------------------------------------------------ fingerprints

FP_IDS = [f"d{i}" for i in range(12)]
FP_TEXTS = [f"text number {i} about " + "cells " * (i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def tiny(tiny_model_path) -> BiEncoder:
    return BiEncoder.from_pretrained(tiny_model_path)


def _changed_weight(model: BiEncoder) -> BiEncoder:
    model = copy.deepcopy(model)
    _, parameter = list(model.named_parameters())[-1]
    with torch.no_grad():
        parameter.view(-1)[0] += 1e-3
    return model


def _with_config(model: BiEncoder, **changes) -> BiEncoder:
    model = copy.deepcopy(model)
    model.config = dataclasses.replace(model.config, **changes)
    return model


def _with_precision(model: BiEncoder, precision: str) -> BiEncoder:
    model = copy.deepcopy(model)
    model.precision = precision
    return model


# name -> (model, ids, texts, kind) from (tiny model, its folder)
MISSES = {
    "one-weight": lambda m, p: (_changed_weight(m), FP_IDS, FP_TEXTS, "doc"),
    "one-text": lambda m, p: (m, FP_IDS, [*FP_TEXTS[:-1], FP_TEXTS[-1] + "!"], "doc"),
    "one-id": lambda m, p: (m, [*FP_IDS[:3], "other", *FP_IDS[4:]], FP_TEXTS, "doc"),
    "two-texts-swapped": lambda m, p: (m, FP_IDS, [FP_TEXTS[1], FP_TEXTS[0], *FP_TEXTS[2:]], "doc"),
    "kind": lambda m, p: (m, FP_IDS, FP_TEXTS, "query"),
    "max-length": lambda m, p: (_with_config(m, max_length=8), FP_IDS, FP_TEXTS, "doc"),
    "doc-prefix": lambda m, p: (_with_config(m, doc_prefix="passage: "), FP_IDS, FP_TEXTS, "doc"),
    "pooling": lambda m, p: (BiEncoder.from_pretrained(p, pooling="cls"), FP_IDS, FP_TEXTS, "doc"),
    "num-layers": lambda m, p: (
        BiEncoder.from_pretrained(p, num_layers=1),
        FP_IDS,
        FP_TEXTS,
        "doc",
    ),
    "projection": lambda m, p: (
        BiEncoder.from_pretrained(p, projection_dim=16),
        FP_IDS,
        FP_TEXTS,
        "doc",
    ),
    "precision-bf16": lambda m, p: (_with_precision(m, "bf16"), FP_IDS, FP_TEXTS, "doc"),
}


@pytest.mark.parametrize("change", sorted(MISSES))
def test_any_change_names_another_entry_and_encodes_again(
    change, tiny, tiny_model_path, tmp_path, one_thread
):
    root = tmp_path / "store"
    base, calls = _counted_encode(tiny, FP_IDS, FP_TEXTS, "doc", root, shard_rows=5)
    assert sum(map(len, calls)) == len(FP_TEXTS)
    model, ids, texts, kind = MISSES[change](tiny, tiny_model_path)
    key = entry_key(model, ids, texts, kind)
    assert entry_path(root, key) != base.path
    assert find(root, key) is None
    if model.precision == "bf16" and not bf16_supported(model.device):
        # No bf16 here: the encode it starts refuses, which it would not reach on a hit.
        calls = []
        original = model.encode
        model.encode = lambda chunk, *a, **k: calls.append(chunk) or original(chunk, *a, **k)
        with pytest.raises(RuntimeError, match="bf16"):
            encode_to_store(model, ids, texts, kind, root, shard_rows=5, show_progress=False)
        assert calls == [texts[:5]]
        return
    store, calls = _counted_encode(model, ids, texts, kind, root, shard_rows=5)
    assert store.path == entry_path(root, key) != base.path
    assert sum(map(len, calls)) == len(texts)
    assert find(root, entry_key(tiny, FP_IDS, FP_TEXTS, "doc")).path == base.path
    if change == "one-weight":
        assert entries_of(root, weights_fingerprint(tiny)) == [base.path]
        assert entries_of(root, weights_fingerprint(model)) == [store.path]


def test_the_same_weights_and_settings_find_their_entry(tiny, tmp_path, one_thread):
    root = tmp_path / "store"
    base, calls = _counted_encode(tiny, FP_IDS, FP_TEXTS, "doc", root, shard_rows=5)
    assert len(calls) == 3

    # What train.py's final evaluation does: the best checkpoint, saved and loaded again.
    tiny.save_pretrained(tmp_path / "best")
    reloaded = BiEncoder.from_pretrained(tmp_path / "best")
    assert weights_fingerprint(reloaded) == weights_fingerprint(tiny)
    same = {
        "again": tiny,
        "reloaded": reloaded,
        # Neither changes a document's raw embedding.
        "query-prefix": _with_config(tiny, query_prefix="query: "),
        "normalize": _with_config(tiny, normalize=not tiny.config.normalize),
        # A compiled model's state_dict names its parameters under _orig_mod.
        "compiled": None,
    }
    for name, model in same.items():
        if model is None:
            assert weights_fingerprint(torch.compile(tiny)) == weights_fingerprint(tiny), name
            continue
        store, calls = _counted_encode(model, FP_IDS, FP_TEXTS, "doc", root, shard_rows=5)
        assert calls == [], name
        assert store.path == base.path, name
        np.testing.assert_array_equal(store.load(), base.load())

    # A model with a projection head: its weights go through save_pretrained too.
    projected = BiEncoder.from_pretrained(tmp_path / "best", projection_dim=16)
    first, calls = _counted_encode(projected, FP_IDS, FP_TEXTS, "doc", root, shard_rows=5)
    assert len(calls) == 3 and first.dim == 16
    projected.save_pretrained(tmp_path / "projected")
    again = BiEncoder.from_pretrained(tmp_path / "projected")
    store, calls = _counted_encode(again, FP_IDS, FP_TEXTS, "doc", root, shard_rows=5)
    assert calls == [] and store.path == first.path


def test_texts_fingerprint_keeps_ids_and_texts_apart():
    base = texts_fingerprint(["a", "b"], ["x", "y"])
    assert texts_fingerprint(["a", "b"], ["x", "y"]) == base
    assert texts_fingerprint(["ab", ""], ["x", "y"]) != base  # a boundary moved
    assert texts_fingerprint(["a", "b"], ["y", "x"]) != base
    assert texts_fingerprint(["x", "y"], ["a", "b"]) != base
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        texts_fingerprint(["a", "b"], ["x"])


# ------------------------------------------------------------------------------ search

DIM = 32
CORPUS = 1000


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(7)
    docs = rng.standard_normal((CORPUS, DIM)).astype(np.float32)
    queries = rng.standard_normal((40, DIM)).astype(np.float32)
    return docs, queries


@pytest.fixture(scope="module")
def corpus_store(corpus, tmp_path_factory) -> EmbeddingStore:
    """The corpus in shards of 300, 300, 300 and 100 rows."""
    docs, _ = corpus
    ids, texts = _row_texts(CORPUS)
    root = tmp_path_factory.mktemp("corpus-store")
    store = encode_to_store(
        TableModel(docs), ids, texts, "doc", root, shard_rows=300, show_progress=False
    )
    assert [s["rows"] for s in store.manifest["shards"]] == [300, 300, 300, 100]
    return store


def _embeddings(kind: str, docs: np.ndarray, store: EmbeddingStore) -> Embeddings:
    if kind == "store":
        return store
    if kind == "uneven":
        return ChunkedEmbeddings(docs, [1, 8, 300, 301, 650])
    return InMemoryEmbeddings(docs, [str(i) for i in range(len(docs))])


def _normalise_16(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)[:, :16]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_results(actual, expected, docs, queries, metric):
    """Equal ids and scores up to rounding; ids are compared wherever a score is apart from
    its neighbours by more than rounding can move it (no near-tie)."""
    (scores, ids), (ref_scores, ref_ids) = actual, expected
    assert scores.shape == ids.shape == ref_scores.shape
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    q, d = np.linalg.norm(queries, axis=1).max(), np.linalg.norm(docs, axis=1).max()
    tol = summation_tolerance(docs.shape[1]) * (q * d if metric == "ip" else (q + d) ** 2)
    assert_same_neighbours(scores, ids, ref_scores, ref_ids, tol)
    # Near-ties may swap places, but the same rows come back.
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ref_ids, axis=1))


SEARCHES = {
    "flat-ip": dict(),
    "flat-l2": dict(metric="l2"),
    "flat-normalised-16": dict(transform=_normalise_16),
    "ivf": dict(factory="IVF16,Flat", train_size=300, nprobe=3, seed=5),
    "ivf-l2-normalised-16": dict(
        factory="IVF16,Flat", metric="l2", train_size=400, nprobe=2, transform=_normalise_16
    ),
    "ivf-every-row": dict(factory="IVF16,Flat", nprobe=2),
}


@pytest.mark.parametrize("k", [10, 150, 5000], ids=["k10", "k-over-a-shard", "k-over-corpus"])
@pytest.mark.parametrize("kind", ["store", "uneven", "memory"])
@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_search_by_shards_is_the_in_memory_search(name, kind, k, corpus, corpus_store):
    docs, queries = corpus
    options = SEARCHES[name]
    transform = options.get("transform")
    if transform is not None:
        queries = transform(queries)
    embeddings = _embeddings(kind, docs, corpus_store)
    actual = search_embeddings(embeddings, queries, k, **options)

    build = {n: options[n] for n in ("factory", "metric", "train_size", "seed") if n in options}
    index = build_index(docs if transform is None else transform(docs), **build)
    expected = search(index, queries, k, nprobe=options.get("nprobe"))
    assert expected[0].shape == (len(queries), min(k, CORPUS))
    if options.get("factory", "Flat") == "Flat":
        indexed = docs if transform is None else transform(docs)
        assert_same_results(actual, expected, indexed, queries, options.get("metric", "ip"))
    else:
        # The same training rows give the same lists and the same index: equal results
        # (ids -1 where the probed lists hold fewer than k rows).
        np.testing.assert_array_equal(actual[1], expected[1])
        np.testing.assert_array_equal(actual[0], expected[0])


def test_trained_search_draws_its_training_rows_from_the_seed(corpus, corpus_store):
    """The check above can fail: other training rows give other lists, other results."""
    docs, queries = corpus
    options = dict(factory="IVF16,Flat", train_size=300, nprobe=3)
    actual = search_embeddings(corpus_store, queries, 10, seed=1, **options)
    index = build_index(docs, "IVF16,Flat", train_size=300, seed=0)
    expected = search(index, queries, 10, nprobe=3)
    assert not np.array_equal(actual[1], expected[1])


def _naive_merge(best, new, k):
    scores = np.concatenate([best[0], new[0]], axis=1)
    ids = np.concatenate([best[1], new[1]], axis=1)
    out_scores, out_ids = [], []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        # Higher first; on a tie the earlier column (best's before new's).
        order = sorted(range(len(row_scores)), key=lambda j: (-row_scores[j], j))[:k]
        out_scores.append(row_scores[order])
        out_ids.append(row_ids[order])
    return np.array(out_scores), np.array(out_ids)


@pytest.mark.parametrize("k", [1, 4, 7, 20])
def test_merge_top_k_is_a_stable_sort_of_both(k):
    rng = np.random.default_rng(k)
    for width_best, width_new in [(5, 3), (0, 6), (4, 0), (7, 7)]:
        # Few distinct scores: ties within and across the two.
        best_scores = -np.sort(-rng.integers(0, 4, (9, width_best)), axis=1).astype(np.float32)
        new_scores = -np.sort(-rng.integers(0, 4, (9, width_new)), axis=1).astype(np.float32)
        best = best_scores, rng.integers(0, 100, (9, width_best))
        new = new_scores, rng.integers(100, 200, (9, width_new))
        scores, ids = merge_top_k(best, new, k)
        expected_scores, expected_ids = _naive_merge(best, new, k)
        assert scores.shape == (9, min(k, width_best + width_new))
        np.testing.assert_array_equal(scores, expected_scores)
        np.testing.assert_array_equal(ids, expected_ids)
    tie = merge_top_k(
        (np.array([[2.0, 1.0]]), np.array([[10, 11]])),
        (np.array([[2.0, 1.0]]), np.array([[20, 21]])),
        3,
    )
    np.testing.assert_array_equal(tie[1], [[10, 20, 11]])


# ---------------------------------------------------------------------- rows and load


@pytest.mark.parametrize("kind", ["store", "uneven", "memory"])
def test_rows_and_load_are_the_concatenated_array(kind, corpus, corpus_store):
    docs, _ = corpus
    embeddings = _embeddings(kind, docs, corpus_store)
    assert len(embeddings) == CORPUS and embeddings.dim == DIM
    np.testing.assert_array_equal(embeddings.load(), docs)
    rng = np.random.default_rng(3)
    edges = [0, 1, 7, 8, 299, 300, 301, 599, 600, 650, 899, 900, 999]
    index = np.concatenate([rng.integers(0, CORPUS, 300), edges, edges[::-1], [300, 300, 0]])
    rng.shuffle(index)
    rows = embeddings.rows(index)
    assert rows.dtype == np.float32 and rows.shape == (len(index), DIM)
    np.testing.assert_array_equal(rows, docs[index])
    np.testing.assert_array_equal(embeddings.rows(list(index[:5])), docs[index[:5]])
    assert embeddings.rows([]).shape == (0, DIM)


def test_a_store_holds_its_ids_and_manifest(corpus, corpus_store):
    docs, _ = corpus
    assert corpus_store.ids == _row_texts(CORPUS)[0]
    reopened = EmbeddingStore(corpus_store.path)
    np.testing.assert_array_equal(reopened.load(), docs)
    assert reopened.encoded == 0  # opening encodes nothing
    assert InMemoryEmbeddings(docs, reopened.ids).encoded == CORPUS
    starts = [start for start, _ in reopened.shards()]
    assert starts == [0, 300, 600, 900]


# ----------------------------------------------------------------------------- DDP

DDP_ROWS, DDP_SHARD_ROWS = 53, 8  # 7 shards: rank 0 writes 0, 2, 4, 6 and rank 1 1, 3, 5
NO_COLLECTIVES = (
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "gather",
    "gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "scatter",
    "reduce",
)


def _ddp_table() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((DDP_ROWS, 8)).astype(np.float32)


def encode_on_rank(dist, root: str, out: str) -> None:
    """Runs in each spawned rank (dist_worker.run_in_group): encodes into the shared store
    with every collective but the barrier refused, and records what it encoded."""

    def refused(name):
        def collective(*args, **kwargs):
            raise AssertionError(f"rank {dist.rank} called torch.distributed.{name}")

        return collective

    for name in NO_COLLECTIVES:
        setattr(tdist, name, refused(name))
    barriers = []

    def barrier():
        barriers.append(1)
        dist.barrier()

    model = TableModel(_ddp_table())
    ids, texts = _row_texts(DDP_ROWS)
    sharding = Sharding(dist.rank, dist.world_size, barrier)
    store, calls = _counted_encode(
        model, ids, texts, "doc", root, shard_rows=DDP_SHARD_ROWS, sharding=sharding
    )
    np.testing.assert_array_equal(store.load(), _ddp_table())
    record = {
        "calls": calls,
        "barriers": len(barriers),
        "path": str(store.path),
        "encoded": store.encoded,
    }
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(record))


def test_ranks_write_their_own_shards_without_gathering(tmp_path):
    root, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    dist_worker.run_in_group(encode_on_rank, str(root), str(out), rendezvous=tmp_path / "rv")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    ids, texts = _row_texts(DDP_ROWS)
    starts = range(0, DDP_ROWS, DDP_SHARD_ROWS)
    for rank, record in enumerate(ranks):
        mine = [texts[s : s + DDP_SHARD_ROWS] for s in starts[rank::2]]
        assert record["calls"] == mine, f"rank {rank}"
    # Every rank waits at as many barriers: one more on a rank pairs with a later collective.
    assert ranks[0]["barriers"] == ranks[1]["barriers"], ranks
    assert ranks[0]["path"] == ranks[1]["path"]
    # Each rank counts the rows that all of them encoded.
    assert ranks[0]["encoded"] == ranks[1]["encoded"] == DDP_ROWS

    single, _ = _counted_encode(
        TableModel(_ddp_table()), ids, texts, "doc", tmp_path / "one", shard_rows=DDP_SHARD_ROWS
    )
    entry = Path(ranks[0]["path"])
    assert entry.name == single.path.name
    assert _store_files(entry) == _store_files(single.path)
    assert not [f for f in root.iterdir() if f.name.startswith(TMP_PREFIX)]


def test_sharding_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not a rank of 2"):
        Sharding(2, 2)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "incomplete"])
def test_a_manifest_written_for_another_key_names_its_folder(complete, tmp_path):
    model = TableModel(_ddp_table())
    ids, texts = _row_texts(DDP_ROWS)
    store = encode_to_store(model, ids, texts, "doc", tmp_path, shard_rows=8, show_progress=False)
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["texts"] = texts_fingerprint(ids[:-1], texts[:-1])
    manifest["complete"] = complete
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    names_folder = re.escape(str(store.path))
    key = entry_key(model, ids, texts, "doc")
    if complete:
        with pytest.raises(ValueError, match=names_folder):
            find(tmp_path, key)
    with pytest.raises(ValueError, match=names_folder):
        encode_to_store(model, ids, texts, "doc", tmp_path, shard_rows=8, show_progress=False)


def test_refusals(tmp_path):
    model = TableModel(_ddp_table())
    ids, texts = _row_texts(5)
    for rows in (0, -3):
        with pytest.raises(ValueError, match="shard_rows: must be positive"):
            encode_to_store(model, ids, texts, "doc", tmp_path, shard_rows=rows)
    with pytest.raises(ValueError, match="no texts"):
        encode_to_store(model, [], [], "doc", tmp_path)
    with pytest.raises(ValueError, match="5 ids for 4 texts"):
        encode_to_store(model, ids, texts[:4], "doc", tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not a complete embedding store"):
        EmbeddingStore(tmp_path)
    store = encode_to_store(model, ids, texts, "doc", tmp_path, show_progress=False)
    (store.path / "ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(ValueError, match="4 ids for 5 rows"):
        EmbeddingStore(store.path)
    (store.path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"delete {store.path}")):
        EmbeddingStore(store.path)
    assert os.path.isdir(store.path)
