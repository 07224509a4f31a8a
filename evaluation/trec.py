"""Reading and writing TREC run and qrels files."""

from __future__ import annotations

import os
from collections.abc import Mapping

from biencoder.evaluation.metrics import Qrels, Run, trec_order


def _check_token(value: str, what: str) -> None:
    # TREC files are whitespace-separated, so an id with whitespace would shift every column.
    if not value or any(c.isspace() for c in value):
        raise ValueError(
            f"{what} {value!r} is empty or has whitespace, which TREC files cannot hold"
        )


def write_trec_run(
    run: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    tag: str = "biencoder",
    depth: int | None = None,
) -> None:
    """Write ``run`` as a TREC run file: ``qid Q0 docid rank score tag`` per line.

    Queries are written in sorted order and documents in trec_eval's order (score descending, ties
    by document id descending), with 1-based ranks, so the file ranks exactly as the in-memory run
    is evaluated. Scores are written with ``repr`` and read back bit-exact.

    Args:
        run: query id -> document id -> score.
        path: output file, overwritten.
        tag: run name in the last column.
        depth: keep only the top ``depth`` documents per query; ``None`` keeps all.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be a positive integer or None, got {depth}")
    _check_token(tag, "tag")
    with open(path, "w", encoding="utf-8") as f:
        for qid in sorted(run):
            _check_token(qid, "query id")
            for rank, (doc, score) in enumerate(trec_order(run[qid], depth), start=1):
                _check_token(doc, "document id")
                f.write(f"{qid} Q0 {doc} {rank} {score!r} {tag}\n")


def read_trec_run(path: str | os.PathLike[str]) -> Run:
    """Read a TREC run file (``qid Q0 docid rank score tag``) into query id -> doc id -> score.

    The rank column is ignored, as trec_eval ignores it. Blank lines are skipped.

    Raises:
        ValueError: on a line without 6 columns, a non-numeric score or a repeated (qid, docid).
    """
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(f"{path}:{line_no}: expected 6 columns, got {len(fields)}")
            qid, _, doc, _, score, _ = fields
            docs = run.setdefault(qid, {})
            if doc in docs:
                raise ValueError(f"{path}:{line_no}: document {doc!r} repeated for query {qid!r}")
            try:
                docs[doc] = float(score)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: score {score!r} is not a number") from None
    return run


def write_trec_qrels(qrels: Mapping[str, Mapping[str, int]], path: str | os.PathLike[str]) -> None:
    """Write ``qrels`` as a TREC qrels file: ``qid 0 docid rel`` per line, sorted by qid, docid."""
    with open(path, "w", encoding="utf-8") as f:
        for qid in sorted(qrels):
            _check_token(qid, "query id")
            for doc in sorted(qrels[qid]):
                _check_token(doc, "document id")
                f.write(f"{qid} 0 {doc} {int(qrels[qid][doc])}\n")


def read_trec_qrels(path: str | os.PathLike[str]) -> Qrels:
    """Read a TREC qrels file (``qid iteration docid rel``) into query id -> doc id -> grade.

    Raises:
        ValueError: on a line without 4 columns, a non-integer grade or a repeated (qid, docid).
    """
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise ValueError(f"{path}:{line_no}: expected 4 columns, got {len(fields)}")
            qid, _, doc, rel = fields
            docs = qrels.setdefault(qid, {})
            if doc in docs:
                raise ValueError(f"{path}:{line_no}: document {doc!r} repeated for query {qid!r}")
            try:
                docs[doc] = int(rel)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: relevance {rel!r} is not an integer") from None
    return qrels
