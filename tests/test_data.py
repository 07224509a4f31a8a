"""Tests for the data package: readers, validation errors and the bundled data sets."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from biencoder.data import training_sets
from biencoder.data.beir import Document, load_beir
from biencoder.data.errors import DataError
from biencoder.data.io import iter_jsonl, open_text, resolve
from biencoder.data.paths import SCIFACT_DIR, STSB_DIR
from biencoder.data.sts import ScoredPair, load_sts
from biencoder.data.training import (
    LabelledText,
    Pair,
    Triplet,
    load_labelled,
    load_pairs,
    load_scored_pairs,
    load_triplets,
    pairs_from_beir,
)
from biencoder.data.training_sets import BeirTrainingSet

QRELS_HEADER = "query-id\tcorpus-id\tscore\n"


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (gzip-compressed if it ends in .gz), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def assert_error(
    err: DataError, file_name: str, line: int | None, field: str | None, reason: str
) -> None:
    """Check the attributes and the rendered message of a DataError."""
    message = str(err)
    assert Path(err.path).name == file_name
    assert err.line == line
    assert err.field == field
    location = file_name if line is None else f"{file_name}:{line}"
    assert f"{location}: " in message
    if field is not None:
        assert f"{location}: field '{field}': " in message
    assert reason in message


# --- errors and io ----------------------------------------------------------------------


def test_data_error_message_omits_missing_parts() -> None:
    assert str(DataError("empty text", "corpus.jsonl", 17, "text")) == (
        "corpus.jsonl:17: field 'text': empty text"
    )
    assert str(DataError("bad row", "a.tsv", 3)) == "a.tsv:3: bad row"
    assert str(DataError("no records", Path("dir") / "x.jsonl")) == "dir/x.jsonl: no records"
    assert isinstance(DataError("r", "p"), ValueError)


def test_data_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DataError("empty text", "c.jsonl", 4, "text")))
    assert (err.path, err.line, err.field, str(err)) == (
        "c.jsonl",
        4,
        "text",
        "c.jsonl:4: field 'text': empty text",
    )


def test_open_text_reads_plain_and_gzip(tmp_path: Path) -> None:
    text = "première ligne\nzweite Zeile\n"
    for name in ("a.txt", "a.txt.gz"):
        with open_text(write(tmp_path / name, text)) as f:
            assert f.read() == text


def test_resolve_prefers_plain_then_gzip_and_names_both_when_missing(tmp_path: Path) -> None:
    write(tmp_path / "b.jsonl.gz", "")
    assert resolve(tmp_path, "b.jsonl") == tmp_path / "b.jsonl.gz"
    write(tmp_path / "b.jsonl", "")
    assert resolve(tmp_path, "b.jsonl") == tmp_path / "b.jsonl"
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve(tmp_path, "c.jsonl")
    assert str(tmp_path / "c.jsonl") in str(excinfo.value)
    assert str(tmp_path / "c.jsonl.gz") in str(excinfo.value)


def test_iter_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl.gz", '{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('{"a": 1}\n{"a": \n', 2, "malformed JSON"),
        ('{"a": 1}\n\n[1, 2]\n', 3, "expected a JSON object, got array"),
        ('"just a string"\n', 1, "expected a JSON object, got string"),
    ],
)
def test_iter_jsonl_rejects_bad_lines(tmp_path: Path, content: str, line: int, reason: str) -> None:
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as excinfo:
        list(iter_jsonl(path))
    assert_error(excinfo.value, "bad.jsonl", line, None, reason)


def test_iter_jsonl_reports_invalid_utf8_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError) as excinfo:
        list(iter_jsonl(path))
    assert_error(excinfo.value, "latin1.jsonl", 3, None, "invalid UTF-8")


def test_iter_jsonl_reports_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "trunc.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(*({"i": i} for i in range(1000))).encode())[:-30])
    with pytest.raises(DataError) as excinfo:
        list(iter_jsonl(path))
    assert_error(excinfo.value, "trunc.jsonl.gz", None, None, "corrupt gzip data")


# --- BEIR -------------------------------------------------------------------------------

CORPUS = jsonl(
    {"_id": "d1", "title": "Title one", "text": "Text one."},
    {"_id": "d2", "text": "Text two, no title."},
    {"_id": "d3", "title": "", "text": "Text three."},
    {"_id": "d4", "title": "Only a title", "text": ""},
)
QUERIES = jsonl(
    {"_id": "q1", "text": "query one"},
    {"_id": "q2", "text": "query two"},
    {"_id": "q3", "text": "query three"},
    {"_id": "q4", "text": "query four, no qrels"},
)
QRELS = QRELS_HEADER + "q2\td2\t1\nq1\td3\t2\nq1\td1\t1\nq3\td4\t0\n"


def make_beir(
    root: Path,
    *,
    corpus: str = CORPUS,
    queries: str = QUERIES,
    qrels: str = QRELS,
    gz: bool = False,
    split: str = "test",
) -> Path:
    """Write a small BEIR folder; any file's content can be replaced to make it malformed."""
    ext = ".gz" if gz else ""
    write(root / f"corpus.jsonl{ext}", corpus)
    write(root / f"queries.jsonl{ext}", queries)
    write(root / "qrels" / f"{split}.tsv{ext}", qrels)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_load_beir_reads_valid_folder(tmp_path: Path, gz: bool) -> None:
    ds = load_beir(make_beir(tmp_path, gz=gz))
    assert ds.split == "test"
    assert ds.path == tmp_path
    assert ds.corpus["d1"] == Document("d1", "Title one", "Text one.")
    assert ds.corpus["d2"].title == ""
    assert list(ds.corpus) == ["d1", "d2", "d3", "d4"]
    # q4 has no qrels; q3's only judgement is 0 and is kept (it counts in IR metrics).
    assert ds.queries == {"q2": "query two", "q1": "query one", "q3": "query three"}
    assert ds.qrels == {"q2": {"d2": 1}, "q1": {"d3": 2, "d1": 1}, "q3": {"d4": 0}}
    assert ds.missing == {"qrels_unknown_query": 0, "qrels_unknown_doc": 0}


def test_document_full_text_joins_title_and_text() -> None:
    assert Document("d", "A title", "Some text.").full_text == "A title Some text."
    assert Document("d", "", "Some text.").full_text == "Some text."
    assert Document("d", "Only a title", "").full_text == "Only a title"


def test_load_beir_corpus_size_keeps_judged_docs_plus_seeded_distractors() -> None:
    full = load_beir(SCIFACT_DIR, "test")
    judged = {d for hits in full.qrels.values() for d in hits}
    small = load_beir(SCIFACT_DIR, "test", corpus_size=500, seed=3)
    assert len(small.corpus) == 500
    assert judged <= set(small.corpus) <= set(full.corpus)
    assert small.queries == full.queries and small.qrels == full.qrels
    assert all(small.corpus[d] == full.corpus[d] for d in small.corpus)
    assert set(load_beir(SCIFACT_DIR, "test", corpus_size=500, seed=3).corpus) == set(small.corpus)
    assert set(load_beir(SCIFACT_DIR, "test", corpus_size=500, seed=4).corpus) != set(small.corpus)
    # Fewer slots than judged documents: every judged document stays, no distractor joins.
    assert set(load_beir(SCIFACT_DIR, "test", corpus_size=10).corpus) == judged
    with pytest.raises(ValueError, match="corpus_size must be positive"):
        load_beir(SCIFACT_DIR, "test", corpus_size=0)


def test_pairs_from_beir_keeps_positive_judgements_sorted(tmp_path: Path) -> None:
    ds = load_beir(make_beir(tmp_path))
    assert pairs_from_beir(ds) == [
        Pair("query one", "Title one Text one."),
        Pair("query one", "Text three."),
        Pair("query two", "Text two, no title."),
    ]


@pytest.mark.parametrize(
    ("corpus", "line", "field", "reason"),
    [
        (CORPUS + '{"_id": "d5", "text": \n', 5, None, "malformed JSON"),
        (CORPUS + "[]\n", 5, None, "expected a JSON object"),
        (jsonl({"_id": "d1", "text": "x"}, {"text": "no id"}), 2, "_id", "missing"),
        (jsonl({"_id": "d1", "title": "t"}), 1, "text", "missing"),
        (jsonl({"_id": 7, "text": "numeric id"}), 1, "_id", "expected a string, got 7"),
        (jsonl({"_id": "d1", "title": None, "text": "x"}), 1, "title", "got null"),
        (jsonl({"_id": "d1", "text": ["x"]}), 1, "text", "got array"),
        (jsonl({"_id": "", "text": "x"}), 1, "_id", "empty id"),
        (CORPUS + jsonl({"_id": "d5", "title": "", "text": "  "}), 5, "text", "empty title"),
        (CORPUS + jsonl({"_id": "d2", "text": "again"}), 5, "_id", "duplicate id 'd2'"),
        ("\n\n", None, None, "no documents"),
    ],
)
def test_load_beir_rejects_bad_corpus(
    tmp_path: Path, corpus: str, line: int | None, field: str | None, reason: str
) -> None:
    with pytest.raises(DataError) as excinfo:
        load_beir(make_beir(tmp_path, corpus=corpus))
    assert_error(excinfo.value, "corpus.jsonl", line, field, reason)


@pytest.mark.parametrize(
    ("queries", "line", "field", "reason"),
    [
        (QUERIES + "{oops}\n", 5, None, "malformed JSON"),
        (QUERIES + jsonl({"_id": "q5"}), 5, "text", "missing"),
        (QUERIES + jsonl({"text": "no id"}), 5, "_id", "missing"),
        (QUERIES + jsonl({"_id": "q5", "text": ""}), 5, "text", "empty text"),
        (QUERIES + jsonl({"_id": "q5", "text": 3.5}), 5, "text", "expected a string"),
        (QUERIES + jsonl({"_id": "q1", "text": "dup"}), 5, "_id", "(first on line 1)"),
    ],
)
def test_load_beir_rejects_bad_queries(
    tmp_path: Path, queries: str, line: int, field: str | None, reason: str
) -> None:
    with pytest.raises(DataError) as excinfo:
        load_beir(make_beir(tmp_path, queries=queries))
    assert_error(excinfo.value, "queries.jsonl", line, field, reason)


@pytest.mark.parametrize(
    ("qrels", "line", "field", "reason"),
    [
        (QRELS + "q1\td2\n", 6, None, "expected 3 tab-separated columns, got 2"),
        (QRELS + "q1\td2\t1\textra\n", 6, None, "expected 3 tab-separated columns, got 4"),
        (QRELS + "q1 d2 1\n", 6, None, "got 1"),
        (QRELS + "q1\td2\t0.5\n", 6, "score", "expected an integer, got '0.5'"),
        (QRELS + "\nq1\td2\thigh\n", 7, "score", "expected an integer"),
        (QRELS + "q1\t\t1\n", 6, "corpus-id", "empty id"),
        (QRELS + "q1\td1\t0\n", 6, "corpus-id", "duplicate pair ('q1', 'd1') (first on line 4)"),
        ("q1\td1\t1\n", 1, None, "expected the header"),
        ("", 1, None, "expected the header"),
        (QRELS_HEADER, None, None, "no qrels rows"),
    ],
)
def test_load_beir_rejects_bad_qrels(
    tmp_path: Path, qrels: str, line: int | None, field: str | None, reason: str
) -> None:
    with pytest.raises(DataError) as excinfo:
        load_beir(make_beir(tmp_path, qrels=qrels))
    assert_error(excinfo.value, "test.tsv", line, field, reason)


def test_load_beir_unknown_split_lists_available(tmp_path: Path) -> None:
    make_beir(tmp_path)
    write(tmp_path / "qrels" / "train.tsv.gz", QRELS)
    with pytest.raises(DataError) as excinfo:
        load_beir(tmp_path, "dev")
    message = str(excinfo.value)
    assert "unknown split 'dev'" in message
    assert message.endswith("available: test, train")
    assert load_beir(tmp_path, "train").qrels == load_beir(tmp_path, "test").qrels


def test_load_beir_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    make_beir(tmp_path)
    (tmp_path / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl\.gz"):
        load_beir(tmp_path)


UNKNOWN_IDS_QRELS = QRELS + "q9\td1\t1\nq1\td9\t1\nq8\td8\t1\nq7\td1\t1\nq6\td1\t1\nq5\td1\t1\n"


def test_load_beir_drops_and_counts_unknown_qrels_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="biencoder.data.beir"):
        ds = load_beir(make_beir(tmp_path, qrels=UNKNOWN_IDS_QRELS))
    # q8/d8 (line 8) has both ids unknown and counts in both.
    assert ds.missing == {"qrels_unknown_query": 5, "qrels_unknown_doc": 2}
    assert ds.qrels == {"q2": {"d2": 1}, "q1": {"d3": 2, "d1": 1}, "q3": {"d4": 0}}
    assert set(ds.queries) == {"q1", "q2", "q3"}

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    query_warning, doc_warning = messages
    assert "5 qrels rows whose query-id" in query_warning
    for example in ("'q9' (", "test.tsv:6)", "'q8' (", "test.tsv:8)", "'q7' (", "test.tsv:9)"):
        assert example in query_warning
    assert "'q6'" not in query_warning  # at most 3 examples
    assert "2 qrels rows whose corpus-id" in doc_warning
    assert "'d9' (" in doc_warning
    assert "test.tsv:7)" in doc_warning
    assert "test.tsv:8)" in doc_warning


def test_load_beir_valid_folder_logs_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="biencoder.data.beir"):
        load_beir(make_beir(tmp_path))
    assert caplog.records == []


@pytest.mark.parametrize(
    ("extra_rows", "line", "field", "reason"),
    [
        ("q9\td1\t1\n", 6, "query-id", "id 'q9' is not in the queries"),
        ("q1\td9\t1\nq9\td1\t1\n", 6, "corpus-id", "id 'd9' is not in the corpus"),
    ],
)
def test_load_beir_strict_raises_on_first_unknown_id(
    tmp_path: Path, extra_rows: str, line: int, field: str, reason: str
) -> None:
    with pytest.raises(DataError) as excinfo:
        load_beir(make_beir(tmp_path, qrels=QRELS + extra_rows), strict=True)
    assert_error(excinfo.value, "test.tsv", line, field, reason)


def test_load_beir_rejects_qrels_that_name_no_known_query_and_document(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    qrels = QRELS_HEADER + "q9\td1\t1\nq1\td9\t1\nq8\td8\t2\n"
    with (
        caplog.at_level(logging.WARNING, logger="biencoder.data.beir"),
        pytest.raises(DataError) as excinfo,
    ):
        load_beir(make_beir(tmp_path, qrels=qrels))
    assert_error(
        excinfo.value,
        "test.tsv",
        None,
        None,
        "none of the 3 qrels rows names a known query and document: query-id not in the "
        "queries on 2 rows (e.g. 'q9', line 2), corpus-id not in the corpus on 2 rows "
        "(e.g. 'd9', line 3); are the qrels from the same data set as the queries and corpus?",
    )
    # The error says it all; a warning before it would only repeat it.
    assert caplog.records == []


@pytest.mark.parametrize(
    ("qrels", "reason"),
    [
        (
            QRELS_HEADER + "q1\td1\t0\nq2\td2\t0\n",
            "no relevant document: no score is above 0 in the 2 qrels rows;",
        ),
        (
            # The only positive judgement names an unknown document and is dropped.
            QRELS_HEADER + "q1\td1\t0\nq2\td9\t1\nq3\td4\t-1\n",
            "no relevant document: no score is above 0 in the 2 qrels rows with known ids;",
        ),
    ],
)
def test_load_beir_rejects_qrels_without_a_relevant_document(
    tmp_path: Path, qrels: str, reason: str
) -> None:
    with pytest.raises(DataError) as excinfo:
        load_beir(make_beir(tmp_path, qrels=qrels))
    assert_error(excinfo.value, "test.tsv", None, "score", reason)
    assert "every model would score 0 and there is no pair to train on" in str(excinfo.value)


def test_pairs_from_beir_rejects_queries_without_a_relevant_document(tmp_path: Path) -> None:
    ds = load_beir(make_beir(tmp_path, gz=True))
    # q3's only judgement is 0: kept by load_beir, as the other queries have relevant ones.
    only_q3 = dataclasses.replace(
        ds, queries={"q3": ds.queries["q3"]}, qrels={"q3": ds.qrels["q3"]}
    )
    with pytest.raises(DataError) as excinfo:
        pairs_from_beir(only_q3)
    assert_error(
        excinfo.value,
        "test.tsv.gz",
        None,
        "score",
        "no training pair: no score is above 0 in the 1 qrels rows of these 1 queries",
    )


def test_beir_training_set_without_relevant_documents_fails_before_mining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_beir(tmp_path, qrels=QRELS_HEADER + "q1\td1\t0\nq2\td2\t0\n", split="train")

    def mine(*args: object, **kwargs: object) -> None:
        raise AssertionError("mined hard negatives for a split without training pairs")

    monkeypatch.setattr(training_sets, "mine_hard_negatives", mine)
    with pytest.raises(DataError) as excinfo:
        BeirTrainingSet(str(tmp_path), hard_negatives=2).load()
    assert_error(excinfo.value, "train.tsv", None, "score", "no relevant document")


# --- STS Benchmark ----------------------------------------------------------------------

STS_ROWS = (
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\t"
    "An air plane is taking off.\n"
    'main-news\theadlines\t2016\t0281\t0\tHe said "hi\tShe said "bye"\tSource (http://x)\t'
    "Source (http://x)\n"
    "main-forum\tdeft-forum\t2014\t0002\t3.25\tA man\tA woman\n"
)


@pytest.mark.parametrize("gz", [False, True])
def test_load_sts_reads_rows_with_extra_fields_and_literal_quotes(tmp_path: Path, gz: bool) -> None:
    write(tmp_path / ("sts-dev.csv.gz" if gz else "sts-dev.csv"), STS_ROWS + "\n")
    assert load_sts(tmp_path, "dev") == [
        ScoredPair("A plane is taking off.", "An air plane is taking off.", 5.0),
        ScoredPair('He said "hi', 'She said "bye"', 0.0),
        ScoredPair("A man", "A woman", 3.25),
    ]


@pytest.mark.parametrize(
    ("bad_row", "field", "reason"),
    [
        (
            "g\tf\t2012\t0003\t2.0\tonly one sentence",
            None,
            "at least 7 tab-separated fields, got 6",
        ),
        ("g\tf\t2012\t0003\tfive\ta\tb", "score", "expected a number, got 'five'"),
        ("g\tf\t2012\t0003\t5.5\ta\tb", "score", "outside [0, 5]"),
        ("g\tf\t2012\t0003\t-0.1\ta\tb", "score", "outside [0, 5]"),
        ("g\tf\t2012\t0003\tnan\ta\tb", "score", "outside [0, 5]"),
        ("g\tf\t2012\t0003\t1\t \tb", "sentence1", "empty text"),
        ("g\tf\t2012\t0003\t1\ta\t\textra", "sentence2", "empty text"),
    ],
)
def test_load_sts_rejects_bad_rows(
    tmp_path: Path, bad_row: str, field: str | None, reason: str
) -> None:
    write(tmp_path / "sts-test.csv", STS_ROWS + "\n" + bad_row + "\n" + STS_ROWS)
    with pytest.raises(DataError) as excinfo:
        load_sts(tmp_path, "test")
    assert_error(excinfo.value, "sts-test.csv", 5, field, reason)


def test_load_sts_rejects_empty_file_and_missing_split(tmp_path: Path) -> None:
    write(tmp_path / "sts-train.csv", "\n")
    with pytest.raises(DataError) as excinfo:
        load_sts(tmp_path, "train")
    assert_error(excinfo.value, "sts-train.csv", None, None, "no rows")
    with pytest.raises(FileNotFoundError, match=r"sts-dev\.csv\.gz"):
        load_sts(tmp_path, "dev")


def test_scored_pairs_carry_the_file_and_line_they_came_from(tmp_path: Path) -> None:
    # Lines 1 and 5 are blank: the rows sit on lines 2, 3, 4 and 6.
    sts = write(tmp_path / "sts-train.csv.gz", "\n" + STS_ROWS + "\n" + STS_ROWS.split("\n")[0])
    assert [pair.source for pair in load_sts(tmp_path, "train")] == [
        f"{sts}:{line}" for line in (2, 3, 4, 6)
    ]
    scored = write(
        tmp_path / "scored.jsonl.gz", "\n" + jsonl(GOOD_SCORED) + "\n \n" + jsonl(GOOD_SCORED)
    )
    assert [pair.source for pair in load_scored_pairs(scored)] == [f"{scored}:2", f"{scored}:5"]


def test_scored_pair_source_is_left_out_of_equality_and_hashing() -> None:
    located = ScoredPair("a", "b", 1.0, source="sts-train.csv:12")
    assert located == ScoredPair("a", "b", 1.0)
    assert hash(located) == hash(ScoredPair("a", "b", 1.0, source="other.jsonl:3"))
    assert ScoredPair("a", "b", 1.0).source == ""


# --- training files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz"])
def test_training_readers_parse_valid_files(tmp_path: Path, name: str) -> None:
    pairs = write(tmp_path / "pairs" / name, jsonl({"query": "q", "positive": "p", "id": 3}))
    assert load_pairs(pairs) == [Pair("q", "p")]

    triplets = write(
        tmp_path / "triplets" / name,
        jsonl(
            {"query": "q1", "positive": "p1", "negatives": ["n1"]},
            {"query": "q2", "positive": "p2", "negative": "n2"},
        ),
    )
    assert load_triplets(triplets) == [Triplet("q1", "p1", ("n1",)), Triplet("q2", "p2", ("n2",))]

    scored = write(
        tmp_path / "scored" / name,
        jsonl({"text1": "a", "text2": "b", "score": 1}, {"text1": "c", "text2": "d", "score": 0.5}),
    )
    assert load_scored_pairs(scored) == [ScoredPair("a", "b", 1.0), ScoredPair("c", "d", 0.5)]

    labelled = write(
        tmp_path / "labelled" / name,
        jsonl({"text": "x", "label": 2}, {"text": "y", "label": "pos"}),
    )
    assert load_labelled(labelled) == [LabelledText("x", 2), LabelledText("y", "pos")]


def test_load_triplets_keeps_several_negatives_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.jsonl",
        jsonl(
            {"query": "q1", "positive": "p1", "negatives": ["a", "b", "c"]},
            {"query": "q2", "positive": "p2", "negatives": ["d", "e", "f"]},
        ),
    )
    assert [t.negatives for t in load_triplets(path)] == [("a", "b", "c"), ("d", "e", "f")]


GOOD_PAIR = {"query": "q", "positive": "p"}
GOOD_TRIPLET = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
GOOD_SCORED = {"text1": "a", "text2": "b", "score": 4.0}
GOOD_LABELLED = {"text": "t", "label": 1}

Loader = Callable[[Path], list]


@pytest.mark.parametrize(
    ("loader", "good", "bad", "field", "reason"),
    [
        (load_pairs, GOOD_PAIR, {"positive": "p"}, "query", "missing"),
        (load_pairs, GOOD_PAIR, {"query": "q", "positive": 1}, "positive", "got 1"),
        (load_pairs, GOOD_PAIR, {"query": " ", "positive": "p"}, "query", "empty text"),
        (load_triplets, GOOD_TRIPLET, {"query": "q", "negatives": ["n"]}, "positive", "missing"),
        (load_triplets, GOOD_TRIPLET, {"query": "q", "positive": "p"}, "negatives", "missing"),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": "n1"},
            "negatives",
            "expected an array of strings, got string",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": []},
            "negatives",
            "at least one negative",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": ["n1", None]},
            "negatives[1]",
            "got null",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": ["n1", ""]},
            "negatives[1]",
            "empty text",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": ["n1", "n2"], "negative": "n3"},
            "negative",
            "not both",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negatives": ["n1", "n2", "n3"]},
            "negatives",
            "3 negatives, but line 1 has 2",
        ),
        (
            load_triplets,
            GOOD_TRIPLET,
            {"query": "q", "positive": "p", "negative": "n"},
            "negatives",
            "1 negatives, but line 1 has 2",
        ),
        (load_scored_pairs, GOOD_SCORED, {"text1": "a", "text2": "b"}, "score", "missing"),
        (
            load_scored_pairs,
            GOOD_SCORED,
            {"text1": "a", "text2": "b", "score": "4"},
            "score",
            "expected a number, got string",
        ),
        (
            load_scored_pairs,
            GOOD_SCORED,
            {"text1": "a", "text2": "b", "score": True},
            "score",
            "got true",
        ),
        (
            load_scored_pairs,
            GOOD_SCORED,
            {"text1": "a", "text2": "b", "score": float("nan")},
            "score",
            "expected a finite number",
        ),
        (load_scored_pairs, GOOD_SCORED, {"text1": "a", "text2": "", "score": 1}, "text2", "empty"),
        (load_labelled, GOOD_LABELLED, {"text": "t"}, "label", "missing"),
        (load_labelled, GOOD_LABELLED, {"text": "t", "label": 1.5}, "label", "got 1.5"),
        (load_labelled, GOOD_LABELLED, {"text": "t", "label": False}, "label", "got false"),
        (load_labelled, GOOD_LABELLED, {"text": "t", "label": ""}, "label", "empty label"),
        (load_labelled, GOOD_LABELLED, {"text": "", "label": 0}, "text", "empty text"),
    ],
)
def test_training_readers_reject_bad_records(
    tmp_path: Path, loader: Loader, good: dict, bad: dict, field: str, reason: str
) -> None:
    # The bad record sits on line 4, after two good records and a blank line.
    path = write(tmp_path / "bad.jsonl", jsonl(good, good) + "\n" + jsonl(bad, good))
    with pytest.raises(DataError) as excinfo:
        loader(path)
    assert_error(excinfo.value, "bad.jsonl", 4, field, reason)


@pytest.mark.parametrize(
    ("loader", "good"),
    [
        (load_pairs, GOOD_PAIR),
        (load_triplets, GOOD_TRIPLET),
        (load_scored_pairs, GOOD_SCORED),
        (load_labelled, GOOD_LABELLED),
    ],
)
def test_training_readers_reject_empty_and_malformed_files(
    tmp_path: Path, loader: Loader, good: dict
) -> None:
    empty = write(tmp_path / "empty.jsonl", "\n \n")
    with pytest.raises(DataError) as excinfo:
        loader(empty)
    assert_error(excinfo.value, "empty.jsonl", None, None, "no records")

    malformed = write(tmp_path / "malformed.jsonl.gz", jsonl(good, good) + '{"query": "q",\n')
    with pytest.raises(DataError) as excinfo:
        loader(malformed)
    assert_error(excinfo.value, "malformed.jsonl.gz", 3, None, "malformed JSON")


# --- bundled data -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "n_queries", "n_pairs"), [("test", 300, 339), ("train", 809, 919)]
)
def test_bundled_scifact_counts(split: str, n_queries: int, n_pairs: int) -> None:
    ds = load_beir(SCIFACT_DIR, split, strict=True)
    assert len(ds.corpus) == 5183
    assert len(ds.queries) == n_queries
    assert sum(len(judged) for judged in ds.qrels.values()) == n_pairs
    assert ds.missing == {"qrels_unknown_query": 0, "qrels_unknown_doc": 0}
    assert (SCIFACT_DIR / "corpus.jsonl.gz").is_file()
    assert len(pairs_from_beir(ds)) == sum(
        rel > 0 for judged in ds.qrels.values() for rel in judged.values()
    )


@pytest.mark.parametrize(("split", "n_pairs"), [("train", 5749), ("dev", 1500), ("test", 1379)])
def test_bundled_stsb_counts(split: str, n_pairs: int) -> None:
    pairs = load_sts(STSB_DIR, split)
    assert len(pairs) == n_pairs
    assert all(0.0 <= pair.score <= 5.0 for pair in pairs)
    assert (STSB_DIR / f"sts-{split}.csv.gz").is_file()
