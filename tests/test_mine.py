"""mine.py and data.mining.pipeline's mining step, against sentence-transformers'
mine_hard_negatives.

Most tests share one dense retriever over a SciFact train slice (40 queries, 200 abstracts,
64 tokens) and mine with different options; the command-line test runs mine.py and
train.py as a user does. The embedding-store tests check that dense mining through a store
mines what in-memory embeddings do, and that mine.py encodes a corpus once per model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from configs import compose_config, run_entry
from hydra.errors import ConfigCompositionException

from biencoder import mine as mine_cli
from biencoder.data.beir import load_beir
from biencoder.data.errors import DataError
from biencoder.data.mining.pipeline import MiningReport, mine
from biencoder.data.mining.selection import MiningOptions
from biencoder.data.mining.sets import mining_set_from_beir, mining_set_from_pairs
from biencoder.data.mining.teachers import BiEncoderTeacher, CrossEncoderTeacher
from biencoder.data.paths import SCIFACT_DIR, TINY_DIR
from biencoder.data.training import Pair, load_triplets
from biencoder.evaluation.retrieval import evaluate_retrieval
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.retrievers import BM25Retriever, DenseRetriever
from biencoder.retrieval.store import EmbeddingStore
from biencoder.training.hydra_config import ConfigError

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def scifact_slice():
    """The first 40 SciFact train queries (6 with several relevant abstracts), their
    abstracts and distractors: 200 documents."""
    full = load_beir(SCIFACT_DIR, "train")
    query_ids = sorted(full.qrels)[:40]
    judged = {d for q in query_ids for d in full.qrels[q]}
    others = [d for d in sorted(full.corpus) if d not in judged][: 200 - len(judged)]
    keep = judged | set(others)
    return dataclasses.replace(
        full,
        corpus={d: doc for d, doc in full.corpus.items() if d in keep},
        queries={q: full.queries[q] for q in query_ids},
        qrels={q: full.qrels[q] for q in query_ids},
    )


@pytest.fixture(scope="module")
def source(scifact_slice):
    return mining_set_from_beir(scifact_slice)


@pytest.fixture(scope="module")
def model(minilm_path):
    return BiEncoder.from_pretrained(minilm_path, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def retriever(model, source):
    return DenseRetriever(model, source.corpus)


@pytest.fixture(scope="module")
def stored(model, source, tmp_path_factory):
    """The dense retriever over an embedding store of 64-row shards (4 of them)."""
    root = tmp_path_factory.mktemp("store")
    return DenseRetriever(model, source.corpus, store=root, shard_rows=64)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mined(source, retriever, tmp_path, name="out.jsonl", **options) -> list[dict]:
    out = tmp_path / name
    mine(source, retriever, MiningOptions(**options), out)
    return read(out)


def negatives_by_query(lines: list[dict]) -> dict[str, list[str]]:
    """Each query's negatives (n-tuple lines: a query's lines all list the same ones)."""
    return {line["query"]: line["negatives"] for line in lines}


@pytest.fixture(scope="module")
def cosine(model, retriever, source):
    """cosine(query, texts): the retrieval model's scores, from one encoder call."""
    queries = [query.text for query in source.queries]
    embedded = dict(zip(queries, model.encode(queries, kind="query").numpy(), strict=True))
    rows = {text: row for row, text in enumerate(source.corpus)}
    return lambda query, texts: retriever.vectors([rows[t] for t in texts]) @ embedded[query]


@pytest.fixture(scope="module")
def st_cache(tmp_path_factory) -> str:
    """sentence-transformers' embedding cache, so the parity cases embed the corpus once."""
    return str(tmp_path_factory.mktemp("st-cache"))


# -------------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize(
    "options",
    [
        dict(num_negatives=3, range_max=20, relative_margin=0.05, output_format="n-tuple"),
        dict(
            num_negatives=2,
            range_min=2,
            range_max=12,
            absolute_margin=0.02,
            max_score=0.75,
            min_score=0.3,
            output_format="triplet",
        ),
    ],
)
def test_negatives_equal_sentence_transformers(
    options, source, retriever, minilm_path, st_cache, tmp_path
):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    st_model = SentenceTransformer(minilm_path, device="cpu")
    st_model.max_seq_length = MAX_LENGTH
    pairs = [
        (query.text, source.corpus[positive])
        for query in source.queries
        for positive in query.positives
    ]
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    theirs = mine_hard_negatives(
        dataset,
        st_model,
        corpus=source.corpus,
        sampling_strategy="top",
        use_faiss=False,
        verbose=False,
        cache_folder=st_cache,
        **options,
    )
    ours = mined(source, retriever, tmp_path, **options)
    if options["output_format"] == "n-tuple":
        n = options["num_negatives"]
        expected = [
            [row["query"], row["positive"], [row[f"negative_{i}"] for i in range(1, n + 1)]]
            for row in theirs
        ]
    else:
        expected = [[row["query"], row["positive"], [row["negative"]]] for row in theirs]
    assert [[line["query"], line["positive"], line["negatives"]] for line in ours] == expected
    # Enough lines that a difference in any option's rule would show.
    assert len(expected) > 30


# ------------------------------------------------------------------------------ options


def test_range_min_skips_the_best_candidates(source, retriever, tmp_path):
    wide = mined(
        source, retriever, tmp_path, "a", num_negatives=5, range_max=20, output_format="n-tuple"
    )
    skipped = mined(
        source,
        retriever,
        tmp_path,
        "b",
        num_negatives=3,
        range_min=2,
        range_max=20,
        output_format="n-tuple",
    )
    wide, skipped = negatives_by_query(wide), negatives_by_query(skipped)
    assert skipped == {query: found[2:5] for query, found in wide.items()}


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("max_score", 0.55, lambda score, positive: score <= 0.55),
        ("min_score", 0.45, lambda score, positive: score >= 0.45),
        ("absolute_margin", 0.1, lambda score, positive: score + 0.1 <= positive),
        ("relative_margin", 0.2, lambda score, positive: score <= positive - abs(positive) * 0.2),
    ],
)
def test_score_filters_remove_what_they_say(
    option, value, allowed, source, retriever, cosine, tmp_path
):
    base = dict(num_negatives=3, range_max=30, output_format="triplet")
    before = mined(source, retriever, tmp_path, "a", **base)
    after = mined(source, retriever, tmp_path, "b", **base, **{option: value})
    positives = {q.text: [source.corpus[p] for p in q.positives] for q in source.queries}

    def violations(lines: list[dict]) -> int:
        count = 0
        for line in lines:
            scores = cosine(line["query"], line["negatives"])
            lowest = cosine(line["query"], positives[line["query"]]).min()
            count += sum(not allowed(s, lowest) for s in scores)
        return count

    assert violations(before) > 0  # the filter had something to remove
    assert violations(after) == 0
    assert after != before


def test_random_sampling_draws_seeded_from_the_candidate_window(source, retriever, tmp_path):
    common = dict(num_negatives=3, range_max=15, output_format="n-tuple")
    top = negatives_by_query(mined(source, retriever, tmp_path, "top", **common))
    window = negatives_by_query(
        mined(source, retriever, tmp_path, "win", **{**common, "num_negatives": 15})
    )
    drawn = negatives_by_query(
        mined(source, retriever, tmp_path, "r0", sampling="random", **common)
    )
    again = negatives_by_query(
        mined(source, retriever, tmp_path, "r1", sampling="random", **common)
    )
    other = negatives_by_query(
        mined(source, retriever, tmp_path, "r2", sampling="random", seed=1, **common)
    )
    assert drawn == again and drawn != other and drawn != top
    for query, found in drawn.items():
        # Drawn from the 15 candidates and kept best first.
        assert found == [text for text in window[query] if text in found]


def test_judged_documents_are_never_negatives(scifact_slice, source, retriever, tmp_path):
    lines = mined(
        source, retriever, tmp_path, num_negatives=5, range_max=30, output_format="n-tuple"
    )
    several = [q for q in source.queries if len(q.positives) > 1]
    assert several
    for query in several:
        judged = {source.corpus[row] for row in query.excluded}
        for line in (line for line in lines if line["query"] == query.text):
            assert not judged & set(line["negatives"])
    # The filter had work: another positive ranks among the top hits of some of them.
    hits = retriever.search([q.text for q in several], 10, [q.positives for q in several])
    assert any(
        set(row.tolist()) & (set(q.positives) - {q.positives[0]})
        for q, row in zip(several, hits.ids, strict=True)
    )
    # Judged not relevant (score 0) excludes too; it is no positive, so it writes no line.
    query_id = sorted(scifact_slice.qrels)[0]
    top_doc = retriever.search([scifact_slice.queries[query_id]], 1, [()]).ids[0, 0]
    doc_id = next(
        d for d, doc in scifact_slice.corpus.items() if doc.full_text == source.corpus[top_doc]
    )
    qrels = {**scifact_slice.qrels, query_id: {**scifact_slice.qrels[query_id], doc_id: 0}}
    judged_zero = mining_set_from_beir(dataclasses.replace(scifact_slice, qrels=qrels))
    assert judged_zero.queries[0].excluded >= {top_doc}


def test_output_formats_and_short_queries(source, retriever, tmp_path):
    # A wide margin leaves some queries 1-3 negatives among 6 candidates (measured: 7 of 46
    # pairs, and one pair none).
    common = dict(num_negatives=4, range_max=6, relative_margin=0.15)
    tuples = mined(source, retriever, tmp_path, "n", output_format="n-tuple", **common)
    triplets = mined(source, retriever, tmp_path, "t", output_format="triplet", **common)
    assert all(len(line["negatives"]) == 4 for line in tuples)
    assert all(len(line["negatives"]) == 1 for line in triplets)
    grouped: dict[tuple[str, str], list[str]] = {}
    for line in triplets:
        grouped.setdefault((line["query"], line["positive"]), []).extend(line["negatives"])
    full = {key: found for key, found in grouped.items() if len(found) == 4}
    assert {(t["query"], t["positive"]): t["negatives"] for t in tuples} == full
    assert len(full) < len(grouped)  # short queries: triplet lines, no n-tuple line
    pairs_total = sum(len(q.positives) for q in source.queries)
    assert len(tuples) == len(full) < pairs_total


def test_pairs_input_uses_the_positives_as_corpus():
    pairs = [Pair("q1", "a"), Pair("q2", "b"), Pair("q1", "c"), Pair("q3", "a")]
    source = mining_set_from_pairs(pairs)
    assert source.corpus == ["a", "b", "c"]
    assert [(q.text, q.positives, q.excluded) for q in source.queries] == [
        ("q1", (0, 2), frozenset({0, 2})),
        ("q2", (1,), frozenset({1})),
        ("q3", (0,), frozenset({0})),
    ]


# ------------------------------------------------------------------------------ resuming


def test_resume_after_a_crash_writes_the_same_file(source, retriever, tmp_path):
    options = MiningOptions(num_negatives=3, range_max=20, sampling="random", seed=3)
    whole = tmp_path / "whole.jsonl"
    mine(source, retriever, options, whole, query_batch_size=8)

    class Crash(Exception):
        pass

    class Crashing:
        calls = 0

        def search(self, *args):
            self.calls += 1
            if self.calls == 3:
                raise Crash
            return retriever.search(*args)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Crash):
        mine(source, Crashing(), options, out, query_batch_size=8)
    with open(out, "a") as f:
        f.write('{"query": "torn')  # a line half-written when the process died
    with pytest.raises(ValueError, match=r"out: .* exists; resume=true continues it"):
        mine(source, retriever, options, out, query_batch_size=8)
    with pytest.raises(ValueError, match=r"resume: .* was written with seed=3, now 4"):
        mine(
            source,
            retriever,
            dataclasses.replace(options, seed=4),
            out,
            resume=True,
            query_batch_size=8,
        )
    report = mine(source, retriever, options, out, resume=True, query_batch_size=8)
    assert report.queries == len(source.queries) - 16
    assert out.read_bytes() == whole.read_bytes()
    assert mine(source, retriever, options, out, resume=True, query_batch_size=8).lines == 0


def test_command_line_resume_reuses_the_stored_corpus_embeddings(monkeypatch, tmp_path):
    out = tmp_path / "o.jsonl"
    common = (f"data.path={TINY_DIR}", "model.max_length=16", f"out={out}")
    real_mine, real_encode = mine_cli.mine, BiEncoder.encode

    class Crash(Exception):
        pass

    class Broken:
        def search(self, *args):
            raise Crash

    monkeypatch.setattr(
        mine_cli, "mine", lambda source, _, *a, **k: real_mine(source, Broken(), *a, **k)
    )
    with pytest.raises(Crash):
        mine_cli.run(compose_mine(*common), tmp_path)
    (entry,) = out.with_name("o.jsonl.embeddings").iterdir()
    kept = EmbeddingStore(entry)  # complete: the crash came after the encoding
    assert (len(kept), kept.dim) == (158, 384)
    # The BEIR ids, as an evaluation of the same data stores them.
    assert kept.ids == list(load_beir(TINY_DIR, "train").corpus)
    monkeypatch.setattr(mine_cli, "mine", real_mine)

    def queries_only(self, texts, kind="query", **kwargs):
        assert kind == "query", "the corpus was embedded again"
        return real_encode(self, texts, kind, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", queries_only)
    with pytest.raises(ConfigError, match=r"resume: .* was written with num_negatives=3, now 2"):
        mine_cli.run(compose_mine(*common, "resume=true", "num_negatives=2"), tmp_path)
    report = mine_cli.run(compose_mine(*common, "resume=true"), tmp_path)
    assert report.queries == 100 and report.lines == len(read(out))
    assert mine_cli.run(compose_mine(*common, "resume=true"), tmp_path).lines == 0
    # Kept once mining is complete: mining out again with other options encodes no text.
    out.unlink()
    out.with_name("o.jsonl.progress.json").unlink()
    assert mine_cli.run(compose_mine(*common, "num_negatives=2"), tmp_path).queries == 100


# ------------------------------------------------------------------------- embedding store


def test_the_store_mines_what_in_memory_embeddings_do(source, retriever, stored, tmp_path):
    options = dict(num_negatives=3, range_max=20, relative_margin=0.05, output_format="n-tuple")
    mined(source, retriever, tmp_path, "memory", **options)
    mined(source, stored, tmp_path, "store", **options)
    assert (tmp_path / "store").read_bytes() == (tmp_path / "memory").read_bytes()
    assert [len(shard) for _, shard in stored.embeddings.shards()] == [64, 64, 64, 8]
    assert stored.index is None  # exact search streams the shards
    queries = [query.text for query in source.queries]
    positives = [query.positives for query in source.queries]
    ours, theirs = stored.search(queries, 30, positives), retriever.search(queries, 30, positives)
    np.testing.assert_array_equal(ours.ids, theirs.ids)
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    for a, b in zip(ours.scores_of, theirs.scores_of, strict=True):
        np.testing.assert_array_equal(a, b)
    # The store keeps raw embeddings; the retriever reads them normalised.
    raw = np.linalg.norm(stored.embeddings.rows([0, 1]), axis=1)
    assert not np.allclose(raw, 1.0)
    np.testing.assert_allclose(np.linalg.norm(stored.vectors([0, 1]), axis=1), 1.0, rtol=1e-6)


def doc_encodes(monkeypatch) -> list[int]:
    """The number of texts of each ``encode(kind="doc")`` call from now on."""
    calls: list[int] = []
    real_encode = BiEncoder.encode

    def counting(self, texts, kind="query", **kwargs):
        if kind == "doc":
            calls.append(len(texts))
        return real_encode(self, texts, kind, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", counting)
    return calls


def changed_model(tiny_model_path: str, folder: Path) -> Path:
    """The tiny model with one weight moved: other weights, the same settings."""
    model = BiEncoder.from_pretrained(tiny_model_path)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    model.save_pretrained(folder)
    return folder


def test_mine_py_encodes_a_corpus_once_per_model_in_a_shared_store(
    monkeypatch, tmp_path, tiny_model_path
):
    store = tmp_path / "store"
    common = (f"data.path={TINY_DIR}", f"model.path={tiny_model_path}", "model.max_length=16")
    calls = doc_encodes(monkeypatch)
    first = tmp_path / "a.jsonl"
    mine_cli.run(compose_mine(*common, f"store={store}", f"out={first}"), tmp_path)
    assert calls == [158]
    # store= names the folder: nothing is kept beside out.
    assert not first.with_name("a.jsonl.embeddings").exists()
    # Another run, other options, a fresh out: the corpus is found, not encoded.
    again = tmp_path / "b.jsonl"
    mine_cli.run(compose_mine(*common, f"store={store}", f"out={again}"), tmp_path)
    assert calls == [158]
    assert again.read_bytes() == first.read_bytes()
    # Without store=, the run keeps its own beside out, and encodes there.
    beside = tmp_path / "c.jsonl"
    mine_cli.run(compose_mine(*common, f"out={beside}"), tmp_path)
    assert calls == [158, 158]
    assert beside.read_bytes() == first.read_bytes()
    assert len(list(beside.with_name("c.jsonl.embeddings").iterdir())) == 1
    # Other weights miss: encoded again, into an entry of their own.
    other = changed_model(tiny_model_path, tmp_path / "changed")
    overrides = (f"data.path={TINY_DIR}", f"model.path={other}", "model.max_length=16")
    mine_cli.run(
        compose_mine(*overrides, f"store={store}", f"out={tmp_path / 'd.jsonl'}"), tmp_path
    )
    assert calls == [158, 158, 158]
    entries = [EmbeddingStore(path).manifest for path in sorted(store.iterdir())]
    assert len(entries) == 2
    assert entries[0]["settings"] == entries[1]["settings"]
    assert entries[0]["texts"] == entries[1]["texts"]
    assert entries[0]["model"] != entries[1]["model"]


def test_mine_py_reuses_the_corpus_an_evaluation_stored(monkeypatch, tmp_path, tiny_model_path):
    store = tmp_path / "embeddings"
    model = BiEncoder.from_pretrained(tiny_model_path, max_length=16)
    result = evaluate_retrieval(model, load_beir(TINY_DIR, "train"), store=store)
    assert result.timings["docs_encoded"] == 158
    calls = doc_encodes(monkeypatch)
    overrides = (f"data.path={TINY_DIR}", f"model.path={tiny_model_path}", "model.max_length=16")
    mine_cli.run(
        compose_mine(*overrides, f"store={store}", f"out={tmp_path / 'o.jsonl'}"), tmp_path
    )
    assert calls == []


def test_the_store_misses_a_changed_corpus(monkeypatch, tmp_path, tiny_model_path):
    model = BiEncoder.from_pretrained(tiny_model_path, max_length=16)
    corpus = [f"document {i} about topic {i % 5}" for i in range(30)]
    DenseRetriever(model, corpus, store=tmp_path, shard_rows=8)
    calls = doc_encodes(monkeypatch)
    found = DenseRetriever(model, corpus, store=tmp_path, shard_rows=8)
    assert calls == []
    edited = [*corpus[:-1], "another text"]
    DenseRetriever(model, edited, store=tmp_path, shard_rows=8)
    assert calls == [8, 8, 8, 6]  # a whole entry of its own: the fingerprint names texts
    assert len(list(tmp_path.glob("doc-*"))) == 2
    queries = ["topic 3"]
    np.testing.assert_array_equal(
        found.search(queries, 5, [(0,)]).ids,
        DenseRetriever(model, corpus).search(queries, 5, [(0,)]).ids,
    )


# ------------------------------------------------------------------------------ teachers


def test_bi_encoder_teacher_scores_are_dot_products(source, retriever, tiny_model_path, tmp_path):
    teacher_model = BiEncoder.from_pretrained(tiny_model_path)
    out = tmp_path / "out.jsonl"
    options = MiningOptions(num_negatives=2, range_max=10, output_format="n-tuple")
    mine(source, retriever, options, out, teacher=BiEncoderTeacher(teacher_model))
    lines = read(out)
    assert lines
    for line in lines[:10]:
        texts = [line["positive"], *line["negatives"]]
        query = teacher_model.encode([line["query"]], kind="query")[0]
        expected = [float(teacher_model.encode([t], kind="doc")[0] @ query) for t in texts]
        assert line["scores"] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def cross_encoder_path(tmp_path_factory, minilm_path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_teacher_scores_are_its_logits(
    source, retriever, cross_encoder_path, tiny_model_path, tmp_path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device("cpu")
    assert isinstance(
        mine_cli.load_teacher(mine_cli.TeacherNode(str(cross_encoder_path)), device),
        CrossEncoderTeacher,
    )
    assert isinstance(
        mine_cli.load_teacher(mine_cli.TeacherNode(tiny_model_path), device), BiEncoderTeacher
    )
    out = tmp_path / "out.jsonl"
    options = MiningOptions(num_negatives=2, range_max=10, output_format="triplet")
    mine(source, retriever, options, out, teacher=CrossEncoderTeacher(cross_encoder_path))
    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_path)
    lines = read(out)
    for line in lines[:10]:
        assert len(line["scores"]) == 1 + len(line["negatives"])
        for text, score in zip([line["positive"], *line["negatives"]], line["scores"], strict=True):
            tokens = tokenizer(
                line["query"], text, truncation=True, max_length=512, return_tensors="pt"
            )
            with torch.no_grad():
                assert score == pytest.approx(model(**tokens).logits[0, 0].item(), abs=1e-5)
    assert len({round(s, 6) for line in lines for s in line["scores"]}) > 10  # not constant


# -------------------------------------------------------------------------- command line


def compose_mine(*overrides: str):
    return compose_config("mine", *overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("range_min=-1", "range_min: must be >= 0, got -1"),
        ("num_negatives=0", "num_negatives: must be >= 1"),
        ("range_max=3 range_min=2", "range_max: 3 leaves 1 candidates"),
        ("sampling=best", "sampling: 'best' is not one of top, random"),
        ("output_format=pairs", "output_format: 'pairs' is not one of triplet, n-tuple"),
        ("relative_margin=1.5", r"relative_margin: must be in \[0, 1\)"),
        ("min_score=0.9 max_score=0.5", "min_score: 0.9 is above max_score=0.5"),
        ("retriever=splade", "retriever: 'splade' is not one of dense, bm25"),
        ("index=PQ7", "index: .*PQ7"),
        ("model.batch_size=0", "model.batch_size: must be positive"),
        ("teacher.path=/nonexistent", "teacher.path: /nonexistent is not a folder"),
        ("data.path=/nonexistent", "data.path: /nonexistent does not exist"),
        ("model.path=/nonexistent", "model.path: .*/nonexistent"),
        ("device=gpu0", "device: 'gpu0' is not a device"),
        pytest.param(
            "device=cuda:3",
            "device: 'cuda:3' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        mine_cli.run(compose_mine(*override.split(), f"out={tmp_path / 'o.jsonl'}"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_keys_and_types_fail_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="nonsense_key"):
        compose_mine("nonsense_key=1")
    with pytest.raises(ConfigCompositionException, match="num_negatives"):
        compose_mine("num_negatives=many")
    existing = tmp_path / "o.jsonl"
    existing.write_text("")
    with pytest.raises(ConfigError, match=r"out: .* exists"):
        mine_cli.run(compose_mine(f"out={existing}"), tmp_path)


def test_a_bad_pairs_file_is_named_with_its_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "positive": "p"}\n{"query": "q"}\n')
    with pytest.raises(DataError, match=f"{pairs}:2.*positive"):
        mine_cli.run(compose_mine(f"data.path={pairs}", "retriever=bm25"), tmp_path)


def test_prompts_index_and_retriever_reach_the_search(monkeypatch, tmp_path):
    import faiss

    seen = {}

    def spy(source, retriever, *args, **kwargs):
        seen["retriever"] = retriever
        return MiningReport()

    monkeypatch.setattr(mine_cli, "mine", spy)
    common = (f"data.path={TINY_DIR}", "model.max_length=16")
    mine_cli.run(compose_mine(*common), tmp_path)
    plain = seen["retriever"]
    prompts = ("query_prompt='query: '", "corpus_prompt='passage: '", "index=HNSW32")
    mine_cli.run(compose_mine(*common, *prompts), tmp_path)
    prompted = seen["retriever"]
    assert (prompted.model.config.query_prefix, prompted.model.config.doc_prefix) == (
        "query: ",
        "passage: ",
    )
    assert not np.allclose(prompted.embeddings.load(), plain.embeddings.load(), atol=1e-3)
    queries = ["aspirin and heart attacks"]
    assert not np.allclose(
        prompted.search(queries, 5, [(0,)]).scores_of[0],
        plain.search(queries, 5, [(0,)]).scores_of[0],
        atol=1e-3,
    )
    assert plain.factory == "Flat" and plain.index is None  # exact: the store streamed
    assert isinstance(faiss.downcast_index(prompted.index), faiss.IndexHNSWFlat)
    assert prompted.index.metric_type == faiss.METRIC_INNER_PRODUCT
    mine_cli.run(compose_mine(*common, "retriever=bm25"), tmp_path)
    assert isinstance(seen["retriever"], BM25Retriever)


def test_an_approximate_index_finds_nearly_what_exact_search_does(model, source, retriever, stored):
    # Trained on the store's rows and filled shard by shard.
    hnsw = DenseRetriever(model, source.corpus, factory="HNSW32", embeddings=stored.embeddings)
    assert hnsw.index.ntotal == len(source.corpus)
    queries = [query.text for query in source.queries]
    exact = retriever.search(queries, 10, [()] * len(queries))
    approx = hnsw.search(queries, 10, [()] * len(queries))
    assert (exact.ids == approx.ids).mean() > 0.9
    np.testing.assert_allclose(approx.scores, exact.scores, atol=1e-5)


def test_command_line_writes_triplets_that_train_py_trains_on(tmp_path):
    out = tmp_path / "mined.jsonl"
    run_entry(
        "mine.py",
        f"data.path={TINY_DIR}",
        "data.split=train",
        "num_negatives=2",
        "range_max=30",
        "relative_margin=0.05",
        f"out={out}",
    )
    triplets = load_triplets(out)
    tiny = load_beir(TINY_DIR, "train")
    assert len(triplets) > len(tiny.qrels)  # a line per negative: about 2 per pair
    assert all(t.positive != t.negatives[0] for t in triplets)
    run_dir = tmp_path / "train"
    run_entry(
        "train.py",
        "train_data=jsonl",
        f"train_data.path={out}",
        "train_data.format=triplets",
        "debug=tiny",
        f"hydra.run.dir={run_dir}",
    )
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in step for step in steps)
