"""train_data=hf: 🤗 datasets folders and files as training examples, read lazily."""

import json
import math
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from configs import compose_train, run_entry

from biencoder import train as train_cli
from biencoder.data.errors import DataError
from biencoder.data.hf import HfExamples, HfTrainingSet, resolve_roles
from biencoder.data.sts import ScoredPair
from biencoder.data.training import Pair, Triplet
from biencoder.training.hydra_config import ConfigError
from biencoder.training.tasks import MarginMSETask

ROWS = {
    "anchor": ["what is a cell", "who wrote it", "where is it"],
    "positive": ["a unit of life", "an author", "over there"],
}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Parquet and JSONL files are converted into the datasets cache: a temporary one."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def saved(tmp_path: Path, columns: dict[str, list], name: str = "saved") -> str:
    folder = tmp_path / name
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return str(folder)


def examples(path: str, **kwargs) -> list:
    return list(HfTrainingSet(path, **kwargs).load().examples)


def test_default_column_names_give_pairs_and_other_columns_are_ignored(tmp_path):
    path = saved(tmp_path, {"id": [1, 2, 3], **ROWS})
    assert examples(path) == [Pair(a, p) for a, p in zip(*ROWS.values(), strict=True)]
    assert HfTrainingSet(path).example_type() is Pair


def test_without_an_anchor_column_columns_are_read_by_position(tmp_path):
    path = saved(tmp_path, {"question": ROWS["anchor"], "answer": ROWS["positive"]})
    assert examples(path) == [Pair(a, p) for a, p in zip(*ROWS.values(), strict=True)]


def test_a_column_mapping_picks_and_reorders_columns(tmp_path):
    path = saved(tmp_path, {"question": ROWS["anchor"], "answer": ROWS["positive"]})
    swapped = examples(path, columns={"anchor": "answer", "positive": "question"})
    assert swapped == [Pair(p, a) for a, p in zip(*ROWS.values(), strict=True)]


def test_a_missing_column_is_named_with_the_folder_and_the_columns_there(tmp_path):
    path = saved(tmp_path, {"question": ROWS["anchor"], "answer": ROWS["positive"]})
    with pytest.raises(DataError) as err:
        HfTrainingSet(path, columns={"anchor": "question", "positive": "passage"}).load()
    assert str(err.value) == (
        f"{path}: field 'passage': no such column (columns: question, answer)"
    )


def test_a_missing_column_fails_before_training_under_the_sets_key(tmp_path):
    path = saved(tmp_path, {"question": ROWS["anchor"], "answer": ROWS["positive"]})
    cfg = compose_train(
        "train_data=hf", f"train_data.path={path}", "train_data.columns={anchor: q, positive: a}"
    )
    with pytest.raises(ConfigError) as err:
        train_cli.plan_run(cfg)
    assert str(err.value) == (
        f"train_data: {path}: field 'q': no such column (columns: question, answer)"
    )


def test_a_default_named_anchor_without_a_positive_column_is_named(tmp_path):
    path = saved(tmp_path, {"anchor": ROWS["anchor"], "answer": ROWS["positive"]})
    with pytest.raises(DataError, match=r"field 'positive': no such column \(columns: anchor, "):
        HfTrainingSet(path).load()


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"anchor": "a"}, "columns: needs positive"),
        ({"anchor": "a", "positive": "b", "query": "c"}, "columns: unknown role 'query'"),
    ],
)
def test_a_bad_mapping_fails_when_built(columns, message):
    with pytest.raises(ValueError, match=message):
        HfTrainingSet("anywhere", columns=columns)


def test_numbered_negatives_give_triplets_in_numeric_order(tmp_path):
    negatives = {f"negative_{k}": [f"n{k} {i}" for i in range(3)] for k in (10, 2, 1)}
    path = saved(tmp_path, {**ROWS, **negatives})
    got = examples(path)
    assert HfTrainingSet(path).example_type() is Triplet
    assert got[1] == Triplet(ROWS["anchor"][1], ROWS["positive"][1], ("n1 1", "n2 1", "n10 1"))


def test_one_negative_column_gives_triplets(tmp_path):
    path = saved(tmp_path, {**ROWS, "negative": ["x", "y", "z"]})
    assert examples(path)[2] == Triplet(ROWS["anchor"][2], ROWS["positive"][2], ("z",))


@pytest.mark.parametrize("label", ["score", "label"])
def test_a_score_or_label_column_gives_scored_pairs_that_name_their_row(tmp_path, label):
    path = saved(tmp_path, {"sentence1": ["a", "b"], "sentence2": ["c", "d"], label: [0.5, 3]})
    got = examples(path)
    assert got == [ScoredPair("a", "c", 0.5), ScoredPair("b", "d", 3.0)]
    assert [pair.source for pair in got] == [f"{path}:1", f"{path}:2"]


def test_parquet_files_by_glob_are_read_in_order_and_rows_name_their_file(tmp_path):
    first, second = tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"
    pq.write_table(pa.table({"anchor": ["q1", "q2"], "positive": ["d1", "d2"]}), first)
    pq.write_table(pa.table({"anchor": ["q3", None], "positive": ["d3", "d4"]}), second)
    spec = HfTrainingSet(str(tmp_path / "part-*.parquet"))
    with pytest.raises(DataError) as err:
        spec.load()
    assert str(err.value) == f"{second}:2: field 'anchor': expected a value, got null"
    pq.write_table(pa.table({"anchor": ["q3", "q4"], "positive": ["d3", "d4"]}), second)
    got = HfTrainingSet(str(tmp_path / "part-*.parquet")).load().examples
    assert [e.query for e in got] == ["q1", "q2", "q3", "q4"]


def test_jsonl_through_datasets(tmp_path):
    file = tmp_path / "qa.jsonl"
    rows = [
        {"query": "q1", "answer": "a1", "score": 1},
        {"query": "q2", "answer": "a2", "score": 0},
    ]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = examples(str(file), columns={"anchor": "query", "positive": "answer", "score": "score"})
    assert got == [ScoredPair("q1", "a1", 1.0), ScoredPair("q2", "a2", 0.0)]
    assert got[1].source == f"{file}:2"


def test_a_split_of_a_saved_dataset_dict(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(ROWS),
            "dev": datasets.Dataset.from_dict({"anchor": ["x"], "positive": ["y"]}),
        }
    ).save_to_disk(str(folder))
    assert examples(str(folder), split="dev") == [Pair("x", "y")]
    with pytest.raises(
        ValueError, match=r"split: .* holds several splits; choose one of train, dev"
    ):
        HfTrainingSet(str(folder)).load()
    with pytest.raises(
        ValueError, match=r"split: .* has no split 'test'; choose one of train, dev"
    ):
        HfTrainingSet(str(folder), split="test").load()


@pytest.mark.parametrize(
    ("columns", "where", "reason"),
    [
        (
            {"anchor": ["a", "b", None], "positive": ["c", "d", "e"]},
            "3: field 'anchor'",
            "got null",
        ),
        (
            {"anchor": ["a", " ", "x"], "positive": ["c", "d", "e"]},
            "2: field 'anchor'",
            "empty text",
        ),
        ({"anchor": ["a", "b", "x"], "positive": [1, 2, 3]}, "1: field 'positive'", "got int64"),
        (
            {"s1": ["a", "b", "x"], "s2": ["c", "d", "e"], "score": ["1", "x", "2"]},
            "1: field 'score'",
            "expected a number, got string",
        ),
        (
            {"s1": ["a", "b", "x"], "s2": ["c", "d", "e"], "score": [1.0, 2.0, math.nan]},
            "3: field 'score'",
            "expected a finite number",
        ),
        (
            {"s1": ["a", "b", "x"], "s2": ["c", "d", "e"], "score": [1.0, None, 2.0]},
            "2: field 'score'",
            "got null",
        ),
    ],
)
def test_a_bad_value_names_file_row_and_column(tmp_path, columns, where, reason):
    path = saved(tmp_path, columns)
    with pytest.raises(DataError) as err:
        HfTrainingSet(path).load()
    assert str(err.value).startswith(f"{path}:{where}: ")
    assert reason in str(err.value)


def test_examples_stay_in_the_memory_mapped_table_until_indexed(tmp_path, monkeypatch):
    rows = {"anchor": [f"q{i}" for i in range(5000)], "positive": [f"d{i}" for i in range(5000)]}
    path = saved(tmp_path, rows)
    built = []
    example = HfExamples._example
    monkeypatch.setattr(
        HfExamples, "_example", lambda self, i, v: built.append(i) or example(self, i, v)
    )

    def no_rows(*args, **kwargs):
        raise AssertionError("rows were converted to Python while loading")

    with monkeypatch.context() as loading:
        # Every way to get rows out of a Dataset or its table as Python objects (pyarrow's own
        # types cannot be patched; this table's only Python-level way is HfExamples).
        for name in ("__getitem__", "__iter__", "to_list", "to_dict", "to_pandas", "iter"):
            loading.setattr(datasets.Dataset, name, no_rows)
        loading.setattr(datasets.table.Table, "to_pylist", no_rows)
        loading.setattr(HfExamples, "__getitem__", no_rows)
        loading.setattr(HfExamples, "__iter__", no_rows)
        train_set = HfTrainingSet(path).load()
    examples = train_set.examples
    assert isinstance(examples, HfExamples) and built == []
    assert isinstance(examples.dataset.data, datasets.table.MemoryMappedTable)
    assert not any(isinstance(v, list) and len(v) == 5000 for v in vars(examples).values())
    assert len(examples) == 5000
    assert examples[4321] == Pair("q4321", "d4321") and built == [4321]
    assert examples[-1] == Pair("q4999", "d4999")
    assert [e.query for e in examples][2047:2050] == ["q2047", "q2048", "q2049"]


def test_resolve_roles_refuses_a_score_with_negatives():
    with pytest.raises(DataError, match="scored examples are pairs"):
        resolve_roles(["anchor", "positive", "negative", "score"], None, "f")


def test_an_example_type_the_loss_cannot_train_on_fails_before_loading(tmp_path):
    path = saved(tmp_path, {"s1": ["a"], "s2": ["b"], "score": [1.0]})
    cfg = compose_train("train_data=hf", f"train_data.path={path}")
    with pytest.raises(ConfigError, match=r"not on ScoredPair examples; train_data \(HfTr"):
        train_cli.plan_run(cfg)


def test_train_py_trains_on_a_saved_dataset(tmp_path, tiny_model_path):
    from biencoder.data.beir import load_beir
    from biencoder.data.paths import TINY_DIR

    train = load_beir(TINY_DIR, "train")
    pairs = [
        (train.queries[q], train.corpus[d].full_text) for q in train.qrels for d in train.qrels[q]
    ]
    path = saved(tmp_path, {"question": [q for q, _ in pairs], "answer": [d for _, d in pairs]})
    run_dir = tmp_path / "run"
    run_entry(
        "train.py",
        "train_data=hf",
        f"train_data.path={path}",
        "debug=tiny",
        f"model.path={tiny_model_path}",
        "trainer.eval=false",
        f"hydra.run.dir={run_dir}",
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2]
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()


def _empty_parquet(path: Path) -> None:
    pq.write_table(pa.table({"anchor": pa.array([], pa.string()), "positive": []}), path)


def _empty_saved(path: Path) -> None:
    datasets.Dataset.from_dict({"anchor": [], "positive": []}).save_to_disk(str(path))


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("empty.parquet", _empty_parquet, "no rows"),
        ("empty.csv", lambda p: p.write_text(""), "no rows: the file is empty"),
        ("header.csv", lambda p: p.write_text("anchor,positive\n"), "no rows: the file holds a"),
        ("empty.jsonl", lambda p: p.write_text("\n\n"), "no rows: the file is empty"),
        ("empty.json", lambda p: p.write_text("[]"), "no rows"),
        ("saved", _empty_saved, "no rows"),
        ("broken.parquet", lambda p: p.write_bytes(b"PAR1 cut short"), "not a parquet file: "),
    ],
)
def test_a_file_without_rows_or_unreadable_is_named(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as err:
        HfTrainingSet(str(path)).load()
    assert str(err.value).startswith(f"{path}: {reason}")


def test_a_json_column_of_mixed_types_names_the_first_row_of_the_wrong_type(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"anchor": f"q{i}", "positive": f"d{i}", "score": 1.5} for i in range(5)]
    rows[2]["positive"], rows[3]["positive"], rows[4]["score"] = 17, ["d", "e"], "high"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as err:
        HfTrainingSet(str(path), columns={"anchor": "anchor", "positive": "positive"}).load()
    assert str(err.value) == f"{path}:3: field 'positive': expected a string, got 17"
    rows[2]["positive"] = rows[3]["positive"] = "d"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as err:
        HfTrainingSet(str(path)).load()
    assert str(err.value) == f"{path}:5: field 'score': expected a number, got string"


def test_triplets_name_their_row_for_a_loss_that_needs_what_they_lack(tmp_path):
    path = saved(tmp_path, {**ROWS, "negative": ["x", "y", "z"]})
    got = examples(path)
    assert [triplet.source for triplet in got] == [f"{path}:{row}" for row in (1, 2, 3)]
    with pytest.raises(ValueError, match=rf"^{path}:1: MarginMSETask needs teacher scores"):
        MarginMSETask().check_examples(got)


@pytest.mark.parametrize("multi", [False, True])
def test_an_empty_file_fails_before_training_under_its_key(tmp_path, multi):
    path = tmp_path / "empty.parquet"
    _empty_parquet(path)
    if multi:
        key = "train_data.sets.qa"
        overrides = ["train_data=multi", "+train_data@train_data.sets.qa=hf"]
    else:
        key, overrides = "train_data", ["train_data=hf"]
    cfg = compose_train(*overrides, f"{key}.path={path}")
    with pytest.raises(ConfigError) as err:
        train_cli.plan_run(cfg)
    assert str(err.value) == f"{key}: {path}: no rows"
