"""Hard negatives for retrieval training: BM25 or dense top hits that are not judged relevant.

Two entry points. For training, a light one (``train.py`` mines at startup):

    dataset = load_beir(SCIFACT_DIR, "train")
    negatives = mine_hard_negatives(dataset, num_negatives=4)  # query id -> doc ids
    triplets = triplets_from_beir(dataset, negatives)  # one Triplet per relevant pair

and mining as a step of its own (``python mine.py``), with sentence-transformers'
``mine_hard_negatives`` options and meanings, optional teacher scores, written to a
resumable JSONL file that ``train_data=jsonl train_data.format=triplets`` reads:

    source = mining_set_from_beir(load_beir(SCIFACT_DIR, "train"))
    retriever = DenseRetriever(model, source.corpus)  # or BM25Retriever(source.corpus)
    report = mine(source, retriever, MiningOptions(num_negatives=4), Path("mined.jsonl"))

Progress bars show for loops over more than a thousand texts.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .beir import BeirDataset
from .errors import DataError
from .io import append_durably, read_progress, save_progress
from .training import Pair, Triplet

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
# Lucene's English stop words, as in the BM25 baselines of BEIR (Anserini).
# fmt: off
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
})
# fmt: on
_PROGRESS_MIN = 1000
# Query-by-document score blocks of the dense search stay under this many floats (256 MB).
_DENSE_BLOCK = 1 << 26


def tokenize(text: str, stopwords: Collection[str] = STOPWORDS) -> list[str]:
    """Lowercased ``\\w+`` words of ``text`` minus ``stopwords``; no stemming."""
    return [word for word in _WORD.findall(text.lower()) if word not in stopwords]


class BM25:
    """An in-memory BM25 index over ``corpus_texts``, for corpora up to a few million texts.

    score(q, d) = sum over the words t of q (repeats counted) of
    idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl)), with Lucene's
    idf(t) = log(1 + (N - df + 0.5) / (df + 0.5)). The defaults k1=0.9, b=0.4 are Anserini's.
    Lengths count words after stop-word removal, exactly (Lucene rounds them).
    """

    def __init__(
        self,
        corpus_texts: Sequence[str],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: Collection[str] = STOPWORDS,
    ):
        self.k1, self.b, self.stopwords = k1, b, stopwords
        self.vocabulary: dict[str, int] = {}
        terms, docs, tfs = array.array("i"), array.array("i"), array.array("f")
        lengths = np.zeros(len(corpus_texts), dtype=np.float64)
        progress = tqdm(
            corpus_texts, desc="BM25 index", unit="doc", disable=len(corpus_texts) <= _PROGRESS_MIN
        )
        for doc, text in enumerate(progress):
            words = tokenize(text, stopwords)
            lengths[doc] = len(words)
            for word, tf in Counter(words).items():
                terms.append(self.vocabulary.setdefault(word, len(self.vocabulary)))
                docs.append(doc)
                tfs.append(tf)
        term_of = np.frombuffer(terms, dtype=np.int32)
        # Postings grouped by term; a stable sort keeps each term's documents in order.
        order = np.argsort(term_of, kind="stable")
        df = np.bincount(term_of, minlength=len(self.vocabulary))
        self._starts = np.concatenate([[0], np.cumsum(df)])
        self._docs = np.frombuffer(docs, dtype=np.int32)[order]
        tf = np.frombuffer(tfs, dtype=np.float32)[order].astype(np.float64)
        n_docs = len(corpus_texts)
        self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        avgdl = lengths.mean() if n_docs else 0.0
        norm = k1 * (1 - b + b * lengths / avgdl) if avgdl else np.full(n_docs, k1)
        idf = self.idf[term_of[order]]
        self._weights = (idf * tf * (k1 + 1) / (tf + norm[self._docs])).astype(np.float32)
        self.num_docs = n_docs

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``: float32 [num_docs]."""
        scores = np.zeros(self.num_docs, dtype=np.float32)
        for word in tokenize(query, self.stopwords):
            term = self.vocabulary.get(word)
            if term is not None:
                start, end = self._starts[term], self._starts[term + 1]
                # A term lists each document once, so fancy-index += adds every posting.
                scores[self._docs[start:end]] += self._weights[start:end]
        return scores

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best (document index, score) pairs, best first; only documents sharing a
        word with the query, ties broken by lower index."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.scores(query)
        return [(int(i), float(scores[i])) for i in _top_k(scores, k)]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    matching = np.flatnonzero(scores > 0)
    if len(matching) > k:
        values = scores[matching]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above = matching[values > kth]
        # `matching` is ascending, so the lowest indices among the tied come first.
        tied = matching[values == kth][: k - len(above)]
        matching = np.concatenate([above, tied])
    return matching[np.lexsort((matching, -scores[matching]))]


def mine_hard_negatives(
    dataset: BeirDataset,
    num_negatives: int,
    *,
    method: Literal["bm25", "dense"] = "bm25",
    depth: int = 30,
    skip_top: int = 0,
    seed: int = 0,
    model: BiEncoder | None = None,
) -> dict[str, list[str]]:
    """Map each query id of ``dataset`` to up to ``num_negatives`` hard-negative doc ids.

    Candidates are the top ``depth`` hits of BM25 over ``Document.full_text`` or, with
    ``method="dense"``, of ``model``'s embeddings (exact inner product); the first
    ``skip_top`` ranks are skipped (their unjudged hits are the likeliest unlabelled
    positives), then every document judged for the query, at any relevance, is removed.
    ``num_negatives`` are sampled from the rest by a generator seeded with ``seed`` and the
    query id, so the result does not depend on which other queries are mined. Queries with
    fewer candidates get all of them, in sampled order; they are counted in the log.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if not 0 <= skip_top < depth:
        raise ValueError(f"need 0 <= skip_top < depth, got skip_top={skip_top}, depth={depth}")
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[doc_id].full_text for doc_id in doc_ids]
    query_ids = sorted(dataset.queries)
    query_texts = [dataset.queries[query_id] for query_id in query_ids]
    if method == "bm25":
        index = BM25(doc_texts)
        progress = tqdm(
            query_texts, desc="BM25 search", unit="query", disable=len(query_texts) <= _PROGRESS_MIN
        )
        ranked = [[doc for doc, _ in index.search(text, depth)] for text in progress]
    elif method == "dense":
        if model is None:
            raise ValueError("method='dense' needs a model")
        ranked = _dense_search(model, query_texts, doc_texts, depth)
    else:
        raise ValueError(f"method must be 'bm25' or 'dense', got {method!r}")

    negatives: dict[str, list[str]] = {}
    short = 0
    for query_id, hits in zip(query_ids, ranked, strict=True):
        judged = dataset.qrels.get(query_id, {})
        candidates = [doc_ids[doc] for doc in hits[skip_top:] if doc_ids[doc] not in judged]
        rng = random.Random(f"{seed}:{query_id}")
        negatives[query_id] = rng.sample(candidates, min(num_negatives, len(candidates)))
        short += len(candidates) < num_negatives
    if short:
        log.info(
            "%d of %d queries have fewer than %d %s negatives in the top %d",
            short,
            len(query_ids),
            num_negatives,
            method,
            depth,
        )
    return negatives


def _dense_search(
    model: BiEncoder, query_texts: list[str], doc_texts: list[str], depth: int
) -> list[list[int]]:
    queries = model.encode(query_texts, kind="query")
    docs = model.encode(doc_texts, kind="doc")
    k = min(depth, len(doc_texts))
    rows = max(1, _DENSE_BLOCK // max(1, len(doc_texts)))
    ranked: list[list[int]] = []
    blocks = range(0, len(queries), rows)
    for start in tqdm(blocks, desc="dense search", unit="block", disable=len(blocks) <= 1):
        ranked += torch.topk(queries[start : start + rows] @ docs.T, k, dim=1).indices.tolist()
    return ranked


def triplets_from_beir(
    dataset: BeirDataset, negatives: dict[str, list[str]], num_negatives: int | None = None
) -> list[Triplet]:
    """One Triplet per relevant (relevance > 0) query-document pair, sorted by query id then
    document id, each with ``num_negatives`` negatives (default: the longest list given).

    A query with fewer mined negatives repeats its list cyclically to fill up, as batches
    need equal counts; one with none has its pairs dropped. Both are counted in a warning.
    Raises DataError naming the qrels file when no triplet is left.
    """
    if num_negatives is None:
        num_negatives = max((len(found) for found in negatives.values()), default=0)
    if num_negatives < 1:
        raise ValueError("no negatives to build triplets from")
    triplets: list[Triplet] = []
    padded = dropped = 0
    for query_id in sorted(dataset.qrels):
        judged = sorted(dataset.qrels[query_id].items())
        positives = [doc_id for doc_id, relevance in judged if relevance > 0]
        found = negatives.get(query_id, [])
        if not found:
            dropped += len(positives)
            continue
        if len(found) < num_negatives:
            padded += len(positives)
        negative_texts = tuple(
            dataset.corpus[found[i % len(found)]].full_text for i in range(num_negatives)
        )
        query = dataset.queries[query_id]
        triplets += [
            Triplet(query, dataset.corpus[doc_id].full_text, negative_texts) for doc_id in positives
        ]
    if not triplets:
        # An empty list would surface only later, as a batch size that no batch can fill.
        reason = (
            f"no triplet: all {dropped} relevant pairs belong to queries without a negative"
            if dropped
            else "no triplet: no qrels row of these queries has a score above 0"
        )
        raise DataError(reason, dataset.qrels_path)
    if padded or dropped:
        log.warning(
            "%d pairs have fewer than %d negatives, repeated to fill up; %d pairs dropped "
            "for having none",
            padded,
            num_negatives,
            dropped,
        )
    return triplets


# ------------------------------------------------------------------------ mining as a step

SAMPLING = ("top", "random")
OUTPUT_FORMATS = ("triplet", "n-tuple")
# Why a candidate is not a negative, in the order the filters apply (sentence-transformers').
FILTERS = ("judged", "absolute_margin", "relative_margin", "max_score", "min_score")


@dataclass
class MiningOptions:
    """Which retrieved documents become negatives; sentence-transformers'
    ``mine_hard_negatives`` options with its meanings.

    For each query, ``range_max + m`` documents are retrieved (``m``: the most documents
    excluded for any query). Its judged documents are removed, then every candidate that
    ``absolute_margin`` (score + margin > positive score), ``relative_margin`` (score >
    positive − |positive| × margin; 0.05 is NV-Retriever's "95% of the positive"),
    ``max_score`` or ``min_score`` rules out, comparing with the query's lowest positive
    score. Of the rest, the best ``range_max`` are kept and the first ``range_min`` of those
    skipped; ``sampling="top"`` takes the next ``num_negatives``, ``"random"`` draws them
    (seeded by ``seed`` and the query, so a query's negatives do not depend on the others),
    best first either way. ``range_max=None`` takes sentence-transformers' default:
    ``range_min + num_negatives + m``, or ``range_min + 10 * num_negatives + m`` with a
    margin or ``max_score``.

    ``output_format="n-tuple"`` writes one line per (query, positive) with the negatives
    listed; ``"triplet"`` one line per negative. As in sentence-transformers, a query left
    with fewer than ``num_negatives`` negatives writes no n-tuple line, and triplet lines
    for the negatives it has. Scores are the retriever's; a teacher only scores the written
    lines (sentence-transformers' ``cross_encoder`` rescoring before filtering is not done).
    """

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    output_format: str = "triplet"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives: must be >= 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise ValueError(f"range_min: must be >= 0, got {self.range_min}")
        if self.range_max is not None and self.range_max - self.range_min < self.num_negatives:
            raise ValueError(
                f"range_max: {self.range_max} leaves {self.range_max - self.range_min} "
                f"candidates after skipping range_min={self.range_min}, fewer than "
                f"num_negatives={self.num_negatives}"
            )
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin: must be in [0, 1), got {self.relative_margin}")
        if (
            self.min_score is not None
            and self.max_score is not None
            and self.min_score > self.max_score
        ):
            raise ValueError(
                f"min_score: {self.min_score} is above max_score={self.max_score}: "
                "no candidate could pass"
            )
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_format: {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}"
            )

    def depth(self, max_excluded: int) -> int:
        """``range_max``, or sentence-transformers' default for it."""
        if self.range_max is not None:
            return self.range_max
        filtered = (
            self.absolute_margin is not None
            or self.relative_margin is not None
            or self.max_score is not None
        )
        return self.range_min + self.num_negatives * (10 if filtered else 1) + max_excluded


@dataclass(frozen=True)
class MiningQuery:
    """A query of a :class:`MiningSet`: ``positives`` and ``excluded`` are corpus rows."""

    key: str  # the BEIR query id, or the text for pairs: seeds the query's sampling
    text: str
    positives: tuple[int, ...]  # one n-tuple line each, in output order
    excluded: frozenset[int]  # never a negative: the positives and any other judged row


@dataclass(frozen=True)
class MiningSet:
    """A corpus of distinct texts and the queries to mine negatives for, in output order."""

    corpus: list[str]
    queries: list[MiningQuery]


def mining_set_from_beir(dataset: BeirDataset) -> MiningSet:
    """Queries in id order, each with its relevant (relevance > 0) documents as positives in
    id order; every document judged for a query, at any relevance, is excluded from its
    negatives. Documents of identical text are one corpus row (as sentence-transformers
    deduplicates), so a copy of a positive is never a negative. Queries without a relevant
    document have nothing to pair a negative with and are left out.

    Raises DataError naming the qrels file when no query has a relevant document."""
    rows: dict[str, int] = {}
    for doc in dataset.corpus.values():
        rows.setdefault(doc.full_text, len(rows))

    def row(doc_id: str) -> int:
        return rows[dataset.corpus[doc_id].full_text]

    queries = []
    for query_id in sorted(dataset.qrels):
        judged = dataset.qrels[query_id]
        positives = tuple(dict.fromkeys(row(d) for d, rel in sorted(judged.items()) if rel > 0))
        if positives:
            excluded = frozenset(row(d) for d in judged)
            queries.append(MiningQuery(query_id, dataset.queries[query_id], positives, excluded))
    if not queries:
        raise DataError("no qrels row of these queries has a score above 0", dataset.qrels_path)
    return MiningSet(list(rows), queries)


def mining_set_from_pairs(pairs: Sequence[Pair]) -> MiningSet:
    """The corpus is the distinct positives; pairs of the same query text are one query
    with all their positives, none of which is a negative for it (sentence-transformers'
    rules). Queries and positives keep their order of first appearance."""
    rows: dict[str, int] = {}
    grouped: dict[str, dict[int, None]] = {}
    for pair in pairs:
        row = rows.setdefault(pair.positive, len(rows))
        grouped.setdefault(pair.query, {})[row] = None
    queries = [
        MiningQuery(text, text, tuple(positives), frozenset(positives))
        for text, positives in grouped.items()
    ]
    return MiningSet(list(rows), queries)


@dataclass
class Hits:
    """Search results for a batch of queries: ``ids`` [B, k] corpus rows (-1: none) and
    their ``scores``, best first, and ``scores_of`` the scores of the rows each query asked
    about (its positives)."""

    scores: np.ndarray
    ids: np.ndarray
    scores_of: list[np.ndarray]


class Retriever(Protocol):
    """What :func:`mine` searches with: the top ``k`` corpus rows of each query, and the
    scores of the given ``rows`` (its positives) on the same scale."""

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits: ...


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    return (
        np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf),
        np.pad(ids, ((0, 0), (0, missing)), constant_values=-1),
    )


class DenseRetriever:
    """Nearest neighbours by inner product of ``model``'s normalised embeddings.

    The corpus is embedded once (``kind="doc"``, the model's document prefix), unless
    ``embeddings`` gives them already (one row per corpus text, from an earlier run), and
    indexed with FAISS through :func:`evaluation.search.build_index`: ``factory="Flat"`` is
    exact, any other factory string (``"HNSW32"``, ``"IVF1024,PQ32"``) approximate, on the
    GPUs when faiss sees any. Positives are scored exactly, from the stored embeddings.
    """

    def __init__(
        self,
        model: BiEncoder,
        corpus: list[str],
        *,
        factory: str = "Flat",
        batch_size: int = 64,
        seed: int = 0,
        embeddings: np.ndarray | None = None,
    ):
        # Imported here: the evaluation package imports data, so a module-level import
        # would be circular.
        from biencoder.evaluation.search import build_index

        self.model, self.batch_size = model, batch_size
        if embeddings is None:
            embeddings = model.encode(
                corpus, kind="doc", batch_size=batch_size, normalize=True, show_progress=True
            ).numpy()
        elif len(embeddings) != len(corpus):
            raise ValueError(f"embeddings: {len(embeddings)} rows for {len(corpus)} texts")
        self.embeddings = embeddings
        self.index = build_index(self.embeddings, factory, metric="ip", seed=seed)

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits:
        from biencoder.evaluation.search import search  # see __init__

        embedded = self.model.encode(
            queries,
            kind="query",
            batch_size=self.batch_size,
            normalize=True,
            show_progress=False,
        ).numpy()
        scores, ids = _pad(*search(self.index, embedded, k), k)
        scores_of = [self.embeddings[list(r)] @ q for q, r in zip(embedded, rows, strict=True)]
        return Hits(scores, ids, scores_of)


class BM25Retriever:
    """:class:`BM25` top hits (documents sharing a word with the query, so possibly fewer
    than asked for); scores are BM25 scores, which margins and score bounds then compare."""

    def __init__(self, corpus: list[str]):
        self.index = BM25(corpus)

    def search(self, queries: list[str], k: int, rows: list[tuple[int, ...]]) -> Hits:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores_of = []
        for i, (query, asked) in enumerate(zip(queries, rows, strict=True)):
            # One query's scores over the corpus at a time: memory stays O(corpus).
            row_scores = self.index.scores(query)
            top = _top_k(row_scores, k)
            scores[i, : len(top)], ids[i, : len(top)] = row_scores[top], top
            scores_of.append(row_scores[list(asked)])
        return Hits(scores, ids, scores_of)


class Teacher(Protocol):
    """What scores the written lines: one float per (query, text) pair, pairwise."""

    def score(self, queries: list[str], texts: list[str]) -> list[float]: ...


class BiEncoderTeacher:
    """Teacher scores as the dot product of ``model``'s normalised query and text
    embeddings (cosine similarity)."""

    def __init__(self, model: BiEncoder, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size

    def score(self, queries: list[str], texts: list[str]) -> list[float]:
        encode = partial(
            self.model.encode, batch_size=self.batch_size, normalize=True, show_progress=False
        )
        return (encode(queries, kind="query") * encode(texts, kind="doc")).sum(-1).tolist()


class CrossEncoderTeacher:
    """Teacher scores as the relevance logit of a sequence-classification model with one
    label (a cross-encoder), reading (query, text) as a sentence pair truncated to
    ``max_length`` tokens (default: the tokenizer's limit, capped at the model's positions).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"path: {path} classifies into {self.model.config.num_labels} labels; a "
                "teacher needs a cross-encoder with one relevance logit"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = max_length or min(self.tokenizer.model_max_length, positions)
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, queries: list[str], texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(queries), self.batch_size):
            batch = self.tokenizer(
                queries[start : start + self.batch_size],
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def is_cross_encoder(path: str | Path) -> bool:
    """Whether the model folder at ``path`` holds a sequence-classification model (its
    ``config.json`` names a ``...ForSequenceClassification`` architecture)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no model config: {config_path}")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


@dataclass
class MiningReport:
    """What :func:`mine` wrote: ``lines`` in all, ``short`` queries that got fewer than
    ``num_negatives`` negatives (n-tuple: no line), and per filter of ``FILTERS`` the
    candidates it removed. A resumed run counts only the queries it mined itself."""

    queries: int = 0
    lines: int = 0
    short: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))


def select_negatives(
    ids: np.ndarray,
    scores: np.ndarray,
    query: MiningQuery,
    positive_scores: np.ndarray,
    options: MiningOptions,
    depth: int,
    removed: dict[str, int],
) -> list[int]:
    """The corpus rows that ``options`` make negatives of one query's hits (``ids``,
    ``scores``: best first), best first; counts what each filter removed in ``removed``."""
    lowest = float(positive_scores.min())
    bounds = {
        "absolute_margin": (
            None if options.absolute_margin is None else lowest - options.absolute_margin
        ),
        "relative_margin": (
            None
            if options.relative_margin is None
            else lowest - abs(lowest) * options.relative_margin
        ),
        "max_score": options.max_score,
    }
    candidates = []
    for row, score in zip(ids.tolist(), scores.tolist(), strict=True):
        if row < 0:
            break
        reason = "judged" if row in query.excluded else None
        for name, bound in bounds.items():
            if reason is None and bound is not None and score > bound:
                reason = name
        if reason is None and options.min_score is not None and score < options.min_score:
            reason = "min_score"
        if reason is None:
            candidates.append(row)
        else:
            removed[reason] += 1
    candidates = candidates[:depth][options.range_min :]
    if options.sampling == "top" or len(candidates) <= options.num_negatives:
        return candidates[: options.num_negatives]
    rng = random.Random(f"{options.seed}:{query.key}")
    return [
        candidates[i] for i in sorted(rng.sample(range(len(candidates)), options.num_negatives))
    ]


def resume_state(out: Path, resume: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """Where :func:`mine` would start writing ``out``: the progress record (``queries``
    done, filling ``bytes`` of ``out``) of a run with the same ``settings`` when
    ``resume``, else a fresh one; refusals as :func:`data.io.read_progress`'s."""
    fresh = {"queries": 0, "lines": 0, "bytes": 0, "complete": False}
    return read_progress(out, resume, settings, fresh, "queries")


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
    with open(out, "ab") as file:
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
