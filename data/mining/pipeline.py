"""Mining as a step of its own (``python mine.py``), with sentence-transformers'
``mine_hard_negatives`` options and meanings, optional teacher scores, written to a
resumable JSONL file that ``train_data=jsonl train_data.format=triplets`` reads:

    source = mining_set_from_beir(load_beir(SCIFACT_DIR, "train"))
    retriever = DenseRetriever(model, source.corpus)  # or BM25Retriever(source.corpus)
    report = mine(source, retriever, MiningOptions(num_negatives=4), Path("mined.jsonl"))

(:mod:`data.mining.sets` makes the source, :mod:`retrieval.retrievers` the retriever,
:mod:`data.mining.selection` picks the negatives, :mod:`data.mining.teachers` scores them.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from biencoder.data.io import naming_errors, progress_path, read_progress, save_progress
from biencoder.data.mining.selection import FILTERS, MiningOptions, select_negatives
from biencoder.data.mining.sets import MiningQuery, MiningSet
from biencoder.data.mining.teachers import Teacher
from biencoder.retrieval.retrievers import Retriever
from biencoder.runtime.files import append_durably

log = logging.getLogger(__name__)


@dataclass
class MiningReport:
    """What :func:`mine` wrote: ``lines`` in all, ``short`` queries that got fewer than
    ``num_negatives`` negatives (n-tuple: no line), and per filter of ``FILTERS`` the
    candidates it removed. A resumed run counts only the queries it mined itself."""

    queries: int = 0
    lines: int = 0
    short: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))


def resume_state(out: Path, resume: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """Where :func:`mine` would start writing ``out``: the progress record (``queries``
    done, filling ``bytes`` of ``out``) of a run with the same ``settings`` when
    ``resume``, else a fresh one; refusals as :func:`data.io.read_progress`'s, and a record
    of more bytes than ``out`` holds."""
    fresh = {"queries": 0, "lines": 0, "bytes": 0, "complete": False}
    progress = read_progress(out, resume, settings, fresh, "queries")
    size = out.stat().st_size if out.exists() else 0
    # Cutting ``out`` back to a longer length would pad it with zero bytes.
    if progress["bytes"] > size:
        raise ValueError(
            f"resume: {progress_path(out)} records {progress['bytes']} bytes of {out}, which "
            f"holds {size}; delete both to start over, or restore {out.name} from a copy"
        )
    return progress


def mine(
    source: MiningSet,
    retriever: Retriever,
    options: MiningOptions,
    out: Path,
    *,
    teacher: Teacher | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    query_batch_size: int = 1024,
) -> MiningReport:
    """Mine negatives for every query of ``source`` and write them to ``out`` as JSONL
    lines ``{"query", "positive", "negatives": [...]}``, plus ``"scores": [teacher(query,
    positive), teacher(query, negative) ...]`` with a ``teacher``.

    Queries go ``query_batch_size`` at a time, in ``source`` order: search, select, score,
    append, then record the progress in ``out.progress.json`` (queries done, bytes of
    ``out`` they fill, and ``settings``: whatever identifies the run, by default the
    options, ``query_batch_size`` and whether there is a teacher). Memory holds one
    batch's hits, never a queries × corpus matrix. ``resume=True`` cuts ``out`` back to the
    recorded bytes (a line torn by a crash goes) and continues after the recorded queries,
    refusing if ``settings`` changed; since every query's draw is seeded by itself, the file
    ends byte-identical to an uninterrupted run's. Without ``resume``, an existing ``out``
    is refused rather than overwritten.
    """
    if query_batch_size < 1:
        raise ValueError(f"query_batch_size: must be positive, got {query_batch_size}")
    max_excluded = max(len(query.excluded) for query in source.queries)
    depth = options.depth(max_excluded)
    k = depth + max_excluded
    if settings is None:
        settings = {
            **dataclasses.asdict(options),
            "query_batch_size": query_batch_size,
            "teacher": teacher is not None,
        }
    progress = resume_state(out, resume, settings)
    report = MiningReport()
    if progress["complete"]:
        log.info("%s is complete: %d lines", out, progress["lines"])
        return report
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = source.queries[progress["queries"] :]
    searched = tqdm(
        total=len(source.queries), initial=progress["queries"], desc="search", unit="query"
    )
    written = tqdm(desc="write", unit="line", initial=progress["lines"])
    file = open(out, "ab")  # noqa: SIM115 (closed below, naming its errors)
    try:
        file.truncate(progress["bytes"])
        # Recorded before any work, so a crash in the first batch still resumes.
        save_progress(out, progress)
        for start in range(0, len(todo), query_batch_size):
            batch = todo[start : start + query_batch_size]
            hits = retriever.search(
                [query.text for query in batch], k, [query.positives for query in batch]
            )
            lines = []
            for i, query in enumerate(batch):
                negatives = select_negatives(
                    hits.ids[i],
                    hits.scores[i],
                    query,
                    hits.scores_of[i],
                    options,
                    depth,
                    report.removed,
                )
                report.short += len(negatives) < options.num_negatives
                lines += _lines(source, query, negatives, options)
            searched.update(len(batch))
            if teacher is not None:
                _add_teacher_scores(lines, teacher)
            data = b"".join(
                (json.dumps(line, ensure_ascii=False) + "\n").encode() for line in lines
            )
            with naming_errors(out, "the mined lines"):
                append_durably(file, data)
            written.update(len(lines))
            report.queries += len(batch)
            report.lines += len(lines)
            progress.update(
                queries=progress["queries"] + len(batch),
                lines=progress["lines"] + len(lines),
                bytes=progress["bytes"] + len(data),
            )
            save_progress(out, progress)
    finally:
        # Closing flushes what a write on a full disk left buffered, and fails again.
        with naming_errors(out, "the mined lines"):
            file.close()
    searched.close()
    written.close()
    progress["complete"] = True
    save_progress(out, progress)
    _log_report(report, options, out, progress["lines"])
    return report


def _lines(
    source: MiningSet, query: MiningQuery, negatives: list[int], options: MiningOptions
) -> list[dict[str, Any]]:
    texts = [source.corpus[row] for row in negatives]
    if options.output_format == "triplet":
        groups = [[text] for text in texts]
    else:
        groups = [texts] if len(texts) == options.num_negatives else []
    return [
        {"query": query.text, "positive": source.corpus[positive], "negatives": group}
        for positive in query.positives
        for group in groups
    ]


def _add_teacher_scores(lines: list[dict[str, Any]], teacher: Teacher) -> None:
    # Each (query, text) pair once: a query's negatives repeat over its positives' lines.
    pairs = list(
        dict.fromkeys(
            (line["query"], text)
            for line in lines
            for text in [line["positive"], *line["negatives"]]
        )
    )
    if not pairs:
        return
    scores = dict(zip(pairs, teacher.score(*map(list, zip(*pairs, strict=True))), strict=True))
    for line in lines:
        line["scores"] = [
            scores[line["query"], text] for text in [line["positive"], *line["negatives"]]
        ]


def _log_report(report: MiningReport, options: MiningOptions, out: Path, lines: int) -> None:
    log.info("%d queries mined, %d lines in %s", report.queries, lines, out)
    for name, count in report.removed.items():
        if count:
            log.info("%d candidates removed by %s", count, name)
    if report.short:
        log.warning(
            "%d of %d queries have fewer than %d negatives (%s); widen range_max or loosen "
            "range_min, the margins and the score bounds to find more",
            report.short,
            report.queries,
            options.num_negatives,
            "no n-tuple line" if options.output_format == "n-tuple" else "fewer triplet lines",
        )
