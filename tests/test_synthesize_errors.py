"""synthesize.py on bad input: each refusal names the key and the file at fault, and comes
before any model loads and before a byte of output or progress is written.

The generators here are never loaded (QueryGenerator.load fails the test if called) except
for one GGUF file that transformers cannot read; the GGUF files are a few hundred bytes
written with the gguf package.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np
import pytest
from configs import compose_config

from biencoder import synthesize as synthesize_cli
from biencoder.data import io as data_io
from biencoder.data.beir import load_corpus
from biencoder.data.errors import DataError
from biencoder.data.io import progress_path
from biencoder.data.paths import TINY_DIR
from biencoder.data.synthesis import pipeline
from biencoder.data.synthesis.filters import FilterOptions
from biencoder.data.synthesis.generator import QueryGenerator, Sampling, check_gguf
from biencoder.data.synthesis.options import SynthesisOptions
from biencoder.data.synthesis.prompts import Prompt
from biencoder.data.synthesis.run import check_out
from biencoder.runtime import lock
from biencoder.training.hydra_config import ConfigError

JSON_TEMPLATE = (
    'instruction: Reply in JSON.\ntemplate: "Document: {document}\\nAnswer as '
    '{\\"query\\": \\"...\\"}:"\n'
)


def write_gguf(path: Path, *, big_endian: bool = False) -> Path:
    """A GGUF file of every part the check reads: scalar, string and string-array
    metadata, a non-default alignment, and F32 and F16 tensors."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_custom_alignment(64)
    writer.add_block_count(1)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((3, 16), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((3, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Replies:
    """A generator that asks the same question of every document."""

    name = "replies"

    def generate(self, batch, sampling, *, num_return=1, seed=0):
        return [["What is it about?"] * num_return for _ in batch]


@pytest.fixture
def never_load(monkeypatch):
    monkeypatch.setattr(QueryGenerator, "load", lambda *a, **k: pytest.fail("generator loaded"))


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "model.gguf")


def refused(tmp_path: Path, *overrides: str) -> str:
    """The ConfigError message of synthesize.py with ``overrides``, checked to have left no
    output or progress file."""
    out = tmp_path / "out" / "syn.jsonl"
    cfg = compose_config("synthesize", f"corpus.path={TINY_DIR}", f"out={out}", *overrides)
    with pytest.raises(ConfigError) as err:
        synthesize_cli.run(cfg, tmp_path)
    assert not out.exists() and not progress_path(out).exists()
    return str(err.value)


# ----------------------------------------------------------------------------- prompts


def test_a_template_keeps_literal_braces(tmp_path):
    path = tmp_path / "json.yaml"
    path.write_text(JSON_TEMPLATE)
    text = Prompt.load(path).render("DOC {x}", num_examples=0)
    assert text == 'Reply in JSON.\n\nDocument: DOC {x}\nAnswer as {"query": "..."}:'


@pytest.mark.parametrize(
    ("template", "line", "says"),
    [
        ("template: |\n  Document: {doc}\n  Question:\n", 3, "{doc} is not a placeholder"),
        ("template: |\n  D: {document}\n\n  Q: {query}\n", 5, "{query} is not a placeholder"),
        ("\ntemplate: 'D: {document:.50}'\n", 3, "{document:.50}: write {document}"),
        ("template: 'D: {document.title}'\n", 2, "{document.title}: write {document}"),
        ("template: 'D: {\"document\": 1}'\n", 2, "has no {document} placeholder"),
    ],
)
def test_a_name_in_braces_is_refused_with_the_file_and_line(tmp_path, template, line, says):
    path = tmp_path / "p.yaml"
    path.write_text("instruction: Write one.\n" + template)
    with pytest.raises(DataError) as err:
        Prompt.load(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, "template")
    assert says in err.value.reason


def test_a_prompt_built_in_code_is_checked_too():
    with pytest.raises(ValueError, match=r"template: \{doc\} is not a placeholder"):
        Prompt("p", "Write one.", "Document: {doc}")


def test_a_bad_prompt_file_stops_synthesize_py_before_anything_loads(
    tmp_path, gguf_file, never_load
):
    path = tmp_path / "typo.yaml"
    path.write_text("instruction: Write one.\ntemplate: |\n  Document: {document}\n  {doc}\n")
    message = refused(tmp_path, f"prompt.file={path}", f"generator.path={gguf_file}")
    assert message.startswith(f"prompt.file: {path}:4: field 'template': {{doc}} is not")


def test_literal_braces_reach_the_generator(tmp_path):
    path = tmp_path / "json.yaml"
    path.write_text(JSON_TEMPLATE)
    corpus = list(load_corpus(TINY_DIR).values())
    prompts = []

    class Recording:
        name = "recording"

        def generate(self, batch, sampling, *, num_return=1, seed=0):
            prompts.extend(batch)
            return [['{"query": "what is it?"}'] * num_return for _ in batch]

    options = SynthesisOptions(num_queries=1, filters=FilterOptions(round_trip="none"))
    out = tmp_path / "o.jsonl"
    pipeline.synthesize(
        corpus[:2], corpus, Recording(), Prompt.load(path), Sampling(), options, out
    )
    assert len(prompts) == 2 and all(p.endswith('Answer as {"query": "..."}:') for p in prompts)


# -------------------------------------------------------------------------------- GGUF


def declared_end(path: Path) -> int:
    """Where the gguf package's own reader finds the last tensor's data ending."""
    import gguf

    return max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("big_endian", [False, True])
def test_a_whole_gguf_file_passes_and_every_cut_of_it_is_named(tmp_path, big_endian):
    path = write_gguf(tmp_path / "m.gguf", big_endian=big_endian)
    check_gguf(path)
    data = path.read_bytes()
    end = declared_end(path)
    cut = tmp_path / "cut.gguf"
    for size in range(len(data)):
        cut.write_bytes(data[:size])
        if size >= end:
            check_gguf(cut)  # only the padding after the last tensor is missing
            continue
        with pytest.raises(ValueError) as err:
            check_gguf(cut)
        what = "not a GGUF file" if size < 4 else "the GGUF file is cut short"
        assert str(err.value).startswith(f"path: {cut}: {what}"), size


def test_a_gguf_file_cut_in_its_tensor_data_says_how_long_it_should_be(tmp_path, gguf_file):
    end = declared_end(gguf_file)
    gguf_file.write_bytes(gguf_file.read_bytes()[: end - 1])
    with pytest.raises(
        ValueError, match=rf"cut short \({end - 1:,} bytes, its header declares {end:,}\)"
    ):
        check_gguf(gguf_file)


def test_a_cut_gguf_generator_stops_synthesize_py_before_anything_loads(
    tmp_path, gguf_file, never_load
):
    gguf_file.write_bytes(gguf_file.read_bytes()[:100])
    message = refused(tmp_path, f"generator.path={gguf_file}")
    assert message.startswith(f"generator.path: {gguf_file}: the GGUF file is cut short")
    assert "download it again" in message


def test_a_file_that_is_no_gguf_is_named_after_the_key(tmp_path, never_load):
    path = tmp_path / "model.gguf"
    path.write_text("<html>404 Not Found</html>")
    message = refused(tmp_path, f"generator.path={path}")
    assert message.startswith(f"generator.path: {path}: not a GGUF file")


def test_what_transformers_cannot_load_is_named_after_the_key(gguf_file):
    # A whole GGUF file, but without the tokenizer metadata transformers needs.
    with pytest.raises(ValueError, match=rf"^path: {re.escape(str(gguf_file))}: transformers"):
        QueryGenerator.load(str(gguf_file), dtype="float32")


# ---------------------------------------------------------------- other files and keys


def test_a_generator_folder_with_a_corrupt_config_is_named(tmp_path, never_load):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    message = refused(tmp_path, f"generator.path={folder}")
    assert message.startswith(f"generator.path: {folder / 'config.json'}: not valid JSON")


def test_a_bad_dtype_is_refused_before_the_generator_loads(tmp_path, gguf_file, never_load):
    message = refused(tmp_path, f"generator.path={gguf_file}", "generator.dtype=int8")
    assert message.startswith("generator.dtype: 'int8' is not one of")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda folder: None, "is not a model folder"),
        (lambda folder: folder.mkdir(), "config.json does not exist"),
    ],
)
def test_a_bad_retriever_model_is_named(tmp_path, gguf_file, never_load, make, says):
    folder = tmp_path / "retriever"
    make(folder)
    message = refused(
        tmp_path,
        f"generator.path={gguf_file}",
        "filters.round_trip=dense",
        f"retriever_model={folder}",
    )
    assert message.startswith("retriever_model: ") and str(folder) in message
    assert says in message


def test_an_out_below_a_file_is_refused_before_anything_loads(tmp_path, gguf_file, never_load):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub" / "syn.jsonl"
    cfg = compose_config(
        "synthesize", f"corpus.path={TINY_DIR}", f"generator.path={gguf_file}", f"out={out}"
    )
    with pytest.raises(ConfigError, match=rf"^out: {re.escape(str(blocker))} is a file"):
        synthesize_cli.run(cfg, tmp_path)


def test_an_out_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^out: .* is a folder"):
        check_out(tmp_path)
    check_out(tmp_path / "new" / "deeper" / "o.jsonl")
    assert not (tmp_path / "new").exists()
    # Asked through os.access, which finds every folder writable for root.
    asked = []

    def refuse(path, mode):
        asked.append(Path(path))
        return False

    monkeypatch.setattr("os.access", refuse)
    with pytest.raises(ValueError, match=rf"^out: {re.escape(str(tmp_path))} is not writable"):
        check_out(tmp_path / "new" / "o.jsonl")
    assert asked == [tmp_path]


# ---------------------------------------------------------------------------- full disk


def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("module", "target", "names"),
    [
        (pipeline, "append_durably", "o.jsonl"),
        (data_io, "atomic_write", "o.jsonl.progress.json"),
    ],
)
def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch, module, target, names):
    corpus = list(load_corpus(TINY_DIR).values())
    monkeypatch.setattr(module, target, full)
    options = SynthesisOptions(num_queries=1, filters=FilterOptions(round_trip="none"))
    question = Prompt("q", "Write a question.", "Document: {document}\nQuestion:")
    with pytest.raises(OSError) as err:
        pipeline.synthesize(
            corpus[:2], corpus, Replies(), question, Sampling(), options, tmp_path / "o.jsonl"
        )
    assert err.value.errno == errno.ENOSPC
    assert f"{tmp_path / names}: No space left on device" in str(err.value)


def test_a_second_synthesize_py_on_an_out_being_written_is_refused_naming_the_writer(
    tmp_path, gguf_file, never_load, held_elsewhere
):
    out = tmp_path / "out" / "syn.jsonl"
    pid = held_elsewhere(lock.beside(out))
    cfg = compose_config(
        "synthesize", f"corpus.path={TINY_DIR}", f"out={out}", f"generator.path={gguf_file}"
    )
    with pytest.raises(lock.LockedError, match=f"out: {out} is being written by .* pid {pid} "):
        synthesize_cli.run(cfg, tmp_path)
    assert not out.exists() and not progress_path(out).exists()
