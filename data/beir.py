"""Reader for retrieval data sets in the BEIR folder layout.

A BEIR folder holds ``corpus.jsonl`` (``_id``, optional ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (header ``query-id<TAB>corpus-id<TAB>score``),
each plain or gzip-compressed (``.gz``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .fields import text_field
from .io import iter_jsonl, iter_lines, resolve

logger = logging.getLogger(__name__)

QRELS_HEADER = "query-id\tcorpus-id\tscore"
# BeirDataset.missing key -> (qrels column, what the id must exist in)
_UNKNOWN_ID_KINDS = {
    "qrels_unknown_query": ("query-id", "queries"),
    "qrels_unknown_doc": ("corpus-id", "corpus"),
}


@dataclass(frozen=True)
class Document:
    """One corpus document."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and text joined by a space (the BEIR/MTEB convention); the text if no title."""
        return f"{self.title} {self.text}".strip()


@dataclass
class BeirDataset:
    """A BEIR data set restricted to one qrels split.

    ``queries`` holds only the queries with qrels in the split, including those whose
    relevances are all 0. ``missing`` counts the qrels rows dropped because their query id
    (``"qrels_unknown_query"``) or corpus id (``"qrels_unknown_doc"``) is unknown; a row with
    both unknown counts in both. ``qrels_path`` is the qrels file read, which errors about
    the judgements name (by default ``path/qrels/<split>.tsv``).
    """

    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str
    path: Path
    missing: dict[str, int]
    qrels_path: Path | None = None

    def __post_init__(self) -> None:
        if self.qrels_path is None:
            self.qrels_path = Path(self.path) / "qrels" / f"{self.split}.tsv"


def load_beir(
    path: str | os.PathLike[str],
    split: str = "test",
    *,
    strict: bool = False,
    corpus_size: int | None = None,
    seed: int = 0,
) -> BeirDataset:
    """Load the BEIR data set in folder ``path`` with the qrels of ``split``.

    Qrels rows naming a query or document that does not exist are dropped, counted in
    ``BeirDataset.missing`` and logged as a warning; with ``strict=True`` the first one raises
    DataError instead. Raises DataError for any malformed file or an unknown split, for qrels
    of which no row names a known query and document, and for qrels without a relevant
    document (no score above 0: every model would score 0, and there is nothing to train
    on); FileNotFoundError for a missing file.

    ``corpus_size`` keeps every judged document plus seeded random distractors up to that
    many (see :func:`subsample_corpus`): a cheap proxy for ablations, whose scores are not
    comparable with published full-corpus numbers.
    """
    folder = Path(path)
    qrels_path = _qrels_path(folder, split)
    corpus = _read_corpus(resolve(folder, "corpus.jsonl"))
    queries = _read_queries(resolve(folder, "queries.jsonl"))
    qrels, missing = _read_qrels(qrels_path, corpus, queries, strict=strict)
    dataset = BeirDataset(
        corpus=corpus,
        queries={query_id: queries[query_id] for query_id in qrels},
        qrels=qrels,
        split=split,
        path=folder,
        missing=missing,
        qrels_path=qrels_path,
    )
    if corpus_size is not None:
        dataset = subsample_corpus(dataset, corpus_size, random.Random(seed))
    return dataset


def load_corpus(path: str | os.PathLike[str]) -> dict[str, Document]:
    """The documents of a BEIR folder's ``corpus.jsonl`` (no queries or qrels needed), or of
    a JSONL file in that format (``_id``, optional ``title``, ``text``), by id in file order."""
    path = Path(path)
    return _read_corpus(resolve(path, "corpus.jsonl") if path.is_dir() else path)


def subsample_corpus(dataset: BeirDataset, size: int, rng: random.Random) -> BeirDataset:
    """``dataset`` with its corpus cut to the judged documents of its queries plus random
    distractors drawn with ``rng``, ``size`` documents in all (more if more are judged)."""
    if size <= 0:
        raise ValueError(f"corpus_size must be positive, got {size}")
    judged = {d for hits in dataset.qrels.values() for d in hits}
    others = sorted(set(dataset.corpus) - judged)
    distractors = rng.sample(others, max(0, min(len(others), size - len(judged))))
    keep = judged | set(distractors)
    return dataclasses.replace(
        dataset, corpus={d: doc for d, doc in dataset.corpus.items() if d in keep}
    )


def _qrels_path(folder: Path, split: str) -> Path:
    qrels_dir = folder / "qrels"
    if not qrels_dir.is_dir():
        raise FileNotFoundError(f"no qrels folder: {qrels_dir}")
    try:
        return resolve(qrels_dir, f"{split}.tsv")
    except FileNotFoundError:
        available = sorted(
            {
                entry.name.removesuffix(suffix)
                for entry in qrels_dir.iterdir()
                for suffix in (".tsv", ".tsv.gz")
                if entry.name.endswith(suffix)
            }
        )
        reason = f"unknown split {split!r}; available: {', '.join(available) or 'none'}"
        raise DataError(reason, qrels_dir) from None


def _check_new_id(item_id: str, seen: dict[str, int], path: Path, line: int) -> None:
    if item_id in seen:
        reason = f"duplicate id {item_id!r} (first on line {seen[item_id]})"
        raise DataError(reason, path, line, "_id")
    seen[item_id] = line


def _read_corpus(path: Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    seen: dict[str, int] = {}
    for line_no, record in iter_jsonl(path):
        doc_id = text_field(record, "_id", path, line_no, what="id")
        title = text_field(record, "title", path, line_no, default="", allow_empty=True)
        # A document may have an empty text if its title carries the content.
        text = text_field(record, "text", path, line_no, allow_empty=True)
        if not title.strip() and not text.strip():
            raise DataError("empty title and text", path, line_no, "text")
        _check_new_id(doc_id, seen, path, line_no)
        corpus[doc_id] = Document(doc_id, title, text)
    if not corpus:
        raise DataError("no documents", path)
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line_no, record in iter_jsonl(path):
        query_id = text_field(record, "_id", path, line_no, what="id")
        text = text_field(record, "text", path, line_no)
        _check_new_id(query_id, seen, path, line_no)
        queries[query_id] = text
    if not queries:
        raise DataError("no queries", path)
    return queries


def _read_qrels(
    path: Path, corpus: dict[str, Document], queries: dict[str, str], *, strict: bool
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    lines = iter_lines(path)
    first = next(lines, None)
    if first is None or first[1] != QRELS_HEADER:
        raise DataError(f"expected the header {QRELS_HEADER!r}", path, 1)

    qrels: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], int] = {}
    unknown: dict[str, list[tuple[str, int]]] = {key: [] for key in _UNKNOWN_ID_KINDS}
    for line_no, line in lines:
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 3:
            reason = f"expected 3 tab-separated columns, got {len(columns)}"
            raise DataError(reason, path, line_no)
        query_id, doc_id, score_text = columns
        for column, value in (("query-id", query_id), ("corpus-id", doc_id)):
            if not value.strip():
                raise DataError("empty id", path, line_no, column)
        try:
            score = int(score_text)
        except ValueError:
            reason = f"expected an integer, got {score_text!r}"
            raise DataError(reason, path, line_no, "score") from None
        if (query_id, doc_id) in seen:
            first_line = seen[query_id, doc_id]
            reason = f"duplicate pair ({query_id!r}, {doc_id!r}) (first on line {first_line})"
            raise DataError(reason, path, line_no, "corpus-id")
        seen[query_id, doc_id] = line_no

        known = True
        for key, item_id, known_ids in (
            ("qrels_unknown_query", query_id, queries),
            ("qrels_unknown_doc", doc_id, corpus),
        ):
            if item_id not in known_ids:
                column, source = _UNKNOWN_ID_KINDS[key]
                if strict:
                    raise DataError(f"id {item_id!r} is not in the {source}", path, line_no, column)
                unknown[key].append((item_id, line_no))
                known = False
        if known:
            qrels.setdefault(query_id, {})[doc_id] = score
    if not seen:
        raise DataError("no qrels rows", path)
    if not qrels:
        raise DataError(_nothing_known(len(seen), unknown), path)

    for key, hits in unknown.items():
        if hits:
            column, source = _UNKNOWN_ID_KINDS[key]
            examples = ", ".join(f"{item_id!r} ({path}:{line})" for item_id, line in hits[:3])
            logger.warning(
                "%s: dropped %d qrels rows whose %s is not in the %s, e.g. %s",
                path,
                len(hits),
                column,
                source,
                examples,
            )
    if not any(score > 0 for judged in qrels.values() for score in judged.values()):
        rows = sum(len(judged) for judged in qrels.values())
        known = " with known ids" if any(unknown.values()) else ""
        reason = (
            f"no relevant document: no score is above 0 in the {rows} qrels rows{known}; "
            "every model would score 0 and there is no pair to train on"
        )
        raise DataError(reason, path, field="score")
    return qrels, {key: len(hits) for key, hits in unknown.items()}


def _nothing_known(rows: int, unknown: dict[str, list[tuple[str, int]]]) -> str:
    parts = []
    for key, hits in unknown.items():
        if hits:
            column, source = _UNKNOWN_ID_KINDS[key]
            item_id, line = hits[0]
            parts.append(
                f"{column} not in the {source} on {len(hits)} rows (e.g. {item_id!r}, line {line})"
            )
    return (
        f"none of the {rows} qrels rows names a known query and document: {', '.join(parts)}; "
        "are the qrels from the same data set as the queries and corpus?"
    )
