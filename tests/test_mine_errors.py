"""mine.py's refusals: a broken progress record, a teacher that cannot load and an `out` or
a `store` that cannot be written fail before anything is embedded or written, with a
ConfigError naming the key, the file and the cause; a full disk names the file it was
writing, and an encode it stopped resumes at its first missing shard."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from configs import compose_config

from biencoder import mine as mine_cli
from biencoder.data import io as data_io
from biencoder.data.beir import load_beir
from biencoder.data.io import progress_path
from biencoder.data.mining import pipeline
from biencoder.data.mining.pipeline import mine
from biencoder.data.mining.selection import MiningOptions
from biencoder.data.mining.sets import mining_set_from_beir, mining_set_from_pairs
from biencoder.data.mining.teachers import check_teacher_folder
from biencoder.data.paths import TINY_DIR
from biencoder.data.training import Pair
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.retrievers import BM25Retriever, DenseRetriever
from biencoder.runtime import lock
from biencoder.training.hydra_config import ConfigError


def compose_mine(*overrides: str):
    return compose_config("mine", *overrides)


@pytest.fixture
def no_embedding(monkeypatch):
    """Fails the test if anything loads the retrieval model or embeds a text."""

    def refused(*args, **kwargs):
        raise AssertionError("the model was loaded or the corpus embedded before the error")

    monkeypatch.setattr(BiEncoder, "from_pretrained", refused)
    monkeypatch.setattr(BiEncoder, "encode", refused)


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def small_source():
    pairs = [Pair(f"question {i}", f"answer number {i} about topic {i % 3}") for i in range(12)]
    return mining_set_from_pairs(pairs)


# ------------------------------------------------------------------------ progress record

VALID = {"settings": {}, "queries": 0, "lines": 0, "bytes": 0, "complete": False}
RECORDS = {
    "empty object": ("{}", "missing key 'settings'"),
    "torn": ('{"settings": {}, "queries": 3', r"invalid JSON at line 1, column 30 \(Expecting"),
    "bad line": ('{\n "settings": {},\n "queries": 3,,\n}', "invalid JSON at line 3, column 15"),
    "array": ("[]", "expected a JSON object, got array"),
    "no bytes": (
        json.dumps({key: value for key, value in VALID.items() if key != "bytes"}),
        "missing key 'bytes'",
    ),
    "settings array": (
        json.dumps({**VALID, "settings": []}),
        "key 'settings' is array, expected an object",
    ),
    "negative count": (
        json.dumps({**VALID, "queries": -1}),
        "key 'queries' is -1, expected a non-negative integer",
    ),
    "bool count": (json.dumps({**VALID, "queries": True}), "key 'queries' is true"),
    "int flag": (json.dumps({**VALID, "complete": 1}), "key 'complete' is 1, expected true or"),
}


@pytest.mark.parametrize(("record", "cause"), RECORDS.values(), ids=RECORDS)
def test_a_broken_progress_record_is_refused_naming_it(record, cause, tmp_path, no_embedding):
    out = tmp_path / "o.jsonl"
    out.write_text('{"query": "q"}\n')
    progress_path(out).write_text(record)
    with pytest.raises(ConfigError, match=cause) as raised:
        mine_cli.run(compose_mine(f"out={out}", "resume=true"), tmp_path)
    message = str(raised.value)
    assert message.startswith(f"resume: {progress_path(out)}: ")
    assert "delete it and" in message and "or restore it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.progress.json"]


def test_a_progress_record_that_is_not_utf8_is_refused_naming_it(tmp_path):
    out = tmp_path / "o.jsonl"
    progress_path(out).write_bytes(b'{"settings": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{progress_path(out)}: not UTF-8 text")):
        mine(small_source(), BM25Retriever([]), MiningOptions(), out, resume=True)


def test_a_record_of_more_bytes_than_out_holds_is_refused(tmp_path):
    source = small_source()
    out = tmp_path / "o.jsonl"
    mine(source, BM25Retriever(source.corpus), MiningOptions(), out, query_batch_size=4)
    size = out.stat().st_size
    with open(out, "r+b") as file:
        file.truncate(size // 2)  # restored from an older copy, say
    with pytest.raises(ValueError, match=f"records {size} bytes of .*o.jsonl, which holds"):
        mine(
            source,
            BM25Retriever(source.corpus),
            MiningOptions(),
            out,
            resume=True,
            query_batch_size=4,
        )
    assert out.stat().st_size == size // 2  # not padded with zero bytes


# ---------------------------------------------------------------------------------- teacher


def model_folder(tmp_path: Path, source: str, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder)
    return folder


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def cross_encoder_config(folder: Path, **fields) -> Path:
    """A cross-encoder's config.json (and empty weight and vocabulary files): enough for the
    checks, which read no weights."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "id2label": {"0": "LABEL_0"},
        "max_position_embeddings": 512,
        **fields,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def empty(tmp_path, model):
    folder = tmp_path / "empty"
    folder.mkdir(parents=True)
    return folder, "has no config.json"


def without_weights(tmp_path, model):
    folder = model_folder(tmp_path, model, "noweights")
    (folder / "model.safetensors").unlink()
    return folder, "has no weights; expected one of model.safetensors"


def without_vocabulary(tmp_path, model):
    folder = model_folder(tmp_path, model, "novocab")
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink()
    return folder, "has no tokenizer vocabulary; expected one of tokenizer.json"


def custom_model_code(tmp_path, model):
    folder = model_folder(tmp_path, model, "custom")
    edit_json(folder / "config.json", auto_map={"AutoModel": "modeling_custom.CustomModel"})
    return folder / "config.json", r"field 'auto_map' \(AutoModel\) needs the folder's own Python"


def custom_tokenizer_code(tmp_path, model):
    folder = model_folder(tmp_path, model, "customtok")
    auto_map = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    edit_json(folder / "tokenizer_config.json", auto_map=auto_map)
    return folder / "tokenizer_config.json", r"field 'auto_map' \(AutoTokenizer\)"


def unknown_architecture(tmp_path, model):
    folder = cross_encoder_config(
        tmp_path / "newarch", architectures=["NewBertForSequenceClassification"]
    )
    return folder / "config.json", "'architectures' names NewBertForSequenceClassification"


def unknown_model_type(tmp_path, model):
    folder = cross_encoder_config(tmp_path / "newtype", model_type="new-bert")
    return folder / "config.json", "field 'model_type' 'new-bert' is no sequence classifier"


def two_labels(tmp_path, model):
    folder = cross_encoder_config(tmp_path / "nli", id2label={"0": "no", "1": "yes"})
    return folder / "config.json", "2 labels .*one relevance logit"


def invalid_config(tmp_path, model):
    folder = model_folder(tmp_path, model, "badconfig")
    (folder / "config.json").write_text('{"hidden_size": 32,')
    return folder / "config.json", "invalid JSON"


@pytest.mark.parametrize(
    "case",
    [
        empty,
        without_weights,
        without_vocabulary,
        custom_model_code,
        custom_tokenizer_code,
        unknown_architecture,
        unknown_model_type,
        two_labels,
        invalid_config,
    ],
)
def test_a_teacher_that_cannot_load_fails_before_any_work(
    case, tmp_path, tiny_model_path, no_embedding
):
    named, cause = case(tmp_path / "teachers", tiny_model_path)
    out_dir = tmp_path / "out"
    overrides = (f"teacher.path={named.parent if named.is_file() else named}", f"out={out_dir}/o")
    with pytest.raises(ConfigError, match=cause) as raised:
        mine_cli.run(compose_mine(*overrides), tmp_path)
    assert str(raised.value).startswith(f"teacher.path: {named}")
    assert not out_dir.exists()


def test_a_teacher_max_length_past_its_positions_fails_before_any_work(
    tmp_path, tiny_model_path, no_embedding
):
    overrides = (f"teacher.path={tiny_model_path}", "teacher.max_length=100000")
    with pytest.raises(ConfigError, match=r"teacher.max_length: 100000 tokens exceed the \d+ "):
        mine_cli.run(compose_mine(*overrides, f"out={tmp_path}/o"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_teachers_that_load_pass_the_checks(tmp_path, tiny_model_path, minilm_path):
    from transformers import BertConfig, BertForSequenceClassification

    cross = tmp_path / "cross"
    config = BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(cross)
    shutil.copy(Path(minilm_path) / "tokenizer.json", cross)
    for folder in (tiny_model_path, minilm_path, cross):
        check_teacher_folder(folder, max_length=64)


def test_a_teacher_is_loaded_before_the_corpus_is_embedded(monkeypatch, tmp_path, tiny_model_path):
    teacher = model_folder(tmp_path, tiny_model_path, "truncated")
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    def embedded(*args, **kwargs):
        raise AssertionError("the corpus was embedded before the teacher loaded")

    monkeypatch.setattr(mine_cli, "embedded_retriever", embedded)
    overrides = (f"data.path={TINY_DIR}", f"teacher.path={teacher}", f"out={tmp_path}/o")
    with pytest.raises(ValueError, match=re.escape(f"{weights}: the file is truncated")):
        mine_cli.run(compose_mine(*overrides), tmp_path)


# ------------------------------------------------------------------------------------- out


def test_a_read_only_out_folder_fails_before_any_work(monkeypatch, tmp_path, no_embedding):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    # Root writes through file modes, so the test denies what a user without root is denied.
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != folder and real_access(path, mode)
    )
    for out in (folder / "o.jsonl", folder / "not" / "yet" / "o.jsonl"):
        with pytest.raises(ConfigError, match=f"out: {folder} is not writable, so {out} cannot"):
            mine_cli.run(compose_mine(f"out={out}"), tmp_path)
    assert not any(folder.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_out_folder_is_refused_by_its_mode(tmp_path, no_embedding):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=f"out: {folder} is not writable"):
            mine_cli.run(compose_mine(f"out={folder}/o.jsonl"), tmp_path)
    finally:
        folder.chmod(0o700)
    assert not any(folder.iterdir())


def test_an_out_below_a_file_fails_before_any_work(tmp_path, no_embedding):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"out: {tmp_path / 'file'} is a file"):
        mine_cli.run(compose_mine(f"out={tmp_path}/file/o.jsonl"), tmp_path)


def test_a_store_that_cannot_be_written_fails_before_any_work(monkeypatch, tmp_path, no_embedding):
    (tmp_path / "file").write_text("")
    out = f"out={tmp_path}/o.jsonl"
    with pytest.raises(ConfigError, match=f"store: {tmp_path / 'file'} is a file"):
        mine_cli.run(compose_mine(f"store={tmp_path}/file/store", out), tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != folder and real_access(path, mode)
    )
    with pytest.raises(ConfigError, match=f"store: {folder} is not writable"):
        mine_cli.run(compose_mine(f"store={folder}/store", out), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]


# ------------------------------------------------------------------------------ full disk


def test_a_full_disk_while_storing_the_corpus_embeddings_names_the_store(
    monkeypatch, tmp_path, tiny_model_path
):
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(np, "save", full_disk)
    store = out.with_name("o.jsonl.embeddings")
    overrides = (f"data.path={TINY_DIR}", f"model.path={tiny_model_path}", "model.max_length=16")
    with pytest.raises(
        OSError, match=f"cannot write the corpus embeddings {store}: No space"
    ) as raised:
        mine_cli.run(compose_mine(*overrides, f"out={out}"), tmp_path)
    assert raised.value.errno == errno.ENOSPC
    # No shard, whole or half-written: the entry holds its ids and an incomplete manifest.
    (entry,) = store.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["ids.json", "manifest.json"]
    assert not json.loads((entry / "manifest.json").read_text())["complete"]
    assert not out.exists()


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails, so what is buffered stays buffered and
    closing the file, which flushes it, fails again."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        full_disk()

    def truncate(self, size=None) -> int:
        return 0


def test_a_full_disk_while_writing_the_lines_names_the_file(monkeypatch, tmp_path):
    source, out = small_source(), tmp_path / "o.jsonl"
    monkeypatch.setattr(
        pipeline, "open", lambda *args: io.BufferedWriter(FullDisk()), raising=False
    )
    with pytest.raises(OSError, match=f"cannot write the mined lines {out}: No space") as raised:
        mine(source, BM25Retriever(source.corpus), MiningOptions(), out)
    # The error that surfaces is the one of closing (its flush fails again): it names out too.
    assert raised.value.errno == errno.ENOSPC


def test_a_full_disk_while_recording_progress_names_the_file(monkeypatch, tmp_path):
    source, out = small_source(), tmp_path / "o.jsonl"
    monkeypatch.setattr(data_io, "atomic_write", full_disk)
    record = progress_path(out)
    with pytest.raises(OSError, match=f"cannot write the progress record {record}: No space"):
        mine(source, BM25Retriever(source.corpus), MiningOptions(), out)


# -------------------------------------------------------------------------------- resuming


def test_an_encode_stopped_by_a_crash_resumes_at_its_first_missing_shard(
    monkeypatch, tmp_path, tiny_model_path
):
    model = BiEncoder.from_pretrained(tiny_model_path, max_length=16)
    corpus = small_source().corpus
    whole = DenseRetriever(model, corpus, store=tmp_path / "whole", shard_rows=5)
    real_save, saved = np.save, []

    class Crash(Exception):
        pass

    def crashing(file, array):
        if len(saved) == 2:
            raise Crash  # the process dies writing its third shard
        saved.append(len(array))
        real_save(file, array)

    monkeypatch.setattr(np, "save", crashing)
    with pytest.raises(Crash):
        DenseRetriever(model, corpus, store=tmp_path / "s", shard_rows=5)
    monkeypatch.setattr(np, "save", real_save)
    encoded, real_encode = [], BiEncoder.encode

    def counting(self, texts, kind="query", **kwargs):
        encoded.extend(texts if kind == "doc" else [])
        return real_encode(self, texts, kind, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", counting)
    resumed = DenseRetriever(model, corpus, store=tmp_path / "s", shard_rows=5)
    assert encoded == corpus[10:]  # the third shard only
    np.testing.assert_array_equal(resumed.embeddings.load(), whole.embeddings.load())


def test_a_second_mine_py_on_an_out_being_written_is_refused_naming_the_writer(
    tmp_path, tiny_model_path, no_embedding, held_elsewhere
):
    out = tmp_path / "mined" / "o.jsonl"
    pid = held_elsewhere(lock.beside(out))
    cfg = compose_config(
        "mine", f"data.path={TINY_DIR}", f"model.path={tiny_model_path}", f"out={out}"
    )
    with pytest.raises(lock.LockedError, match=f"out: {out} is being written by .* pid {pid} "):
        mine_cli.run(cfg, tmp_path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl.lock"]  # the holder's


def test_a_store_entry_being_written_is_refused_naming_mine_py_store_key(
    tmp_path, tiny_model_path, held_elsewhere
):
    store = tmp_path / "store"

    def mine(name):
        cfg = compose_config(
            "mine",
            f"data.path={TINY_DIR}",
            f"model.path={tiny_model_path}",
            f"store={store}",
            f"out={tmp_path / name}",
        )
        return mine_cli.run(cfg, tmp_path)

    mine("first.jsonl")
    (entry,) = store.glob("doc-*")
    shutil.rmtree(entry)
    pid = held_elsewhere(lock.beside(entry))
    with pytest.raises(
        lock.LockedError, match=f"^store: {entry} is being written by .* pid {pid} "
    ):
        mine("second.jsonl")


def test_a_disk_too_small_for_the_corpus_embeddings_is_refused_before_embedding(
    tmp_path, tiny_model_path, monkeypatch
):
    out = tmp_path / "mined" / "o.jsonl"
    store = out.with_name("o.jsonl.embeddings")
    usage = shutil.disk_usage(tmp_path)
    real_encode = BiEncoder.encode

    def refused(*args, **kwargs):
        raise AssertionError("the corpus was embedded")

    monkeypatch.setattr(BiEncoder, "encode", refused)
    # The tiny corpus's 158 x 32 float32 embeddings take 20,224 bytes.
    monkeypatch.setattr(
        "biencoder.runtime.files.shutil.disk_usage", lambda _: usage._replace(free=20_000)
    )
    overrides = (f"data.path={TINY_DIR}", f"model.path={tiny_model_path}", f"out={out}")
    cfg = compose_config("mine", *overrides)
    with pytest.raises(ConfigError, match=rf"out: {store}: 0 MiB free .* corpus embeddings"):
        mine_cli.run(cfg, tmp_path)
    shared = tmp_path / "shared"
    with pytest.raises(ConfigError, match=rf"store: {shared}: 0 MiB free .* corpus embeddings"):
        mine_cli.run(compose_config("mine", *overrides, f"store={shared}"), tmp_path)
    monkeypatch.setattr(
        "biencoder.runtime.files.shutil.disk_usage", lambda _: usage._replace(free=20_224)
    )
    with pytest.raises(AssertionError, match="the corpus was embedded"):
        mine_cli.run(cfg, tmp_path)  # enough room: on to the encoding
    # A store that holds the corpus needs no room for it.
    monkeypatch.setattr(BiEncoder, "encode", real_encode)
    model = BiEncoder.from_pretrained(tiny_model_path)
    dataset = load_beir(TINY_DIR, "train")
    source = mining_set_from_beir(dataset)
    DenseRetriever(model, source.corpus, store=shared, ids=list(dataset.corpus))
    monkeypatch.setattr(
        "biencoder.runtime.files.shutil.disk_usage", lambda _: usage._replace(free=0)
    )
    report = mine_cli.run(compose_config("mine", *overrides, f"store={shared}"), tmp_path)
    assert report.queries == 100
