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

(``texts``: the corpus's full texts in order.) :func:`data.synthesis.run.run_synthesis`
does all of this from a :class:`data.synthesis.run.SynthesisConfig`, which is what
``python synthesize.py`` and ``train_data=synthetic`` take.

Each line is ``{"query", "positive", "doc_id", ["negatives"], "provenance", "filters"}``.
The file only grows: documents are done in batches, each appended, flushed and recorded
(with its doc ids) in ``<out>.progress.json``; ``resume=True`` continues after the recorded
batches and never writes a document twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from biencoder.data.beir import Document
from biencoder.data.io import naming_errors, read_progress, save_progress
from biencoder.data.mining.selection import MiningOptions, select_negatives
from biencoder.data.mining.sets import MiningQuery
from biencoder.data.synthesis.filters import (
    Deduplicator,
    FilterOptions,
    length_check,
    round_trip_ranks,
    trigram_overlap,
)
from biencoder.data.synthesis.generator import QueryGenerator, Sampling
from biencoder.data.synthesis.options import SynthesisOptions
from biencoder.data.synthesis.parsing import parse_query
from biencoder.data.synthesis.prompts import Prompt
from biencoder.retrieval.retrievers import BM25Retriever, DenseRetriever, Retriever
from biencoder.runtime.files import append_durably

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

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

    ``retrievers`` maps ``bm25``/``dense`` to the :class:`retrieval.retrievers.Retriever` over
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
        append = files.enter_context(_appending(out, progress["bytes"], "the synthetic queries"))
        if options.save_rejected:
            append_rejected = files.enter_context(
                _appending(rejected_path(out), progress["rejected_bytes"], "the removed replies")
            )
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
            append(data)
            if options.save_rejected:
                removed = _jsonl(rejected)
                append_rejected(removed)
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


@contextlib.contextmanager
def _appending(path: Path, size: int, what: str) -> Iterator[Callable[[bytes], None]]:
    """A function appending to ``path`` and pushing each append to disk, after its first
    ``size`` bytes (what the progress record counts; a crash can leave more). Every OSError
    names ``what`` and ``path``: a failed write names no file, and closing the file flushes
    what a write on a full disk left buffered, failing again."""
    with naming_errors(path, what):
        file = open(path, "ab")  # noqa: SIM115 (closed below, naming its errors too)
    try:
        with naming_errors(path, what):
            file.truncate(size)

        def append(data: bytes) -> None:
            with naming_errors(path, what):
                append_durably(file, data)

        yield append
    finally:
        with naming_errors(path, what):
            file.close()


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
