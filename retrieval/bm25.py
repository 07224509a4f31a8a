"""BM25 over an in-memory corpus: Lucene's English stop words and scoring, as in the BM25
baselines of BEIR (Anserini), for corpora up to a few million texts.

    index = BM25(doc_texts)
    index.search("what causes scurvy", k=10)  # [(document index, score), ...], best first

Progress bars show for loops over more than a thousand texts.
"""

from __future__ import annotations

import array
import re
from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np
from tqdm.auto import tqdm

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
        return [(int(i), float(scores[i])) for i in top_k(scores, k)]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest positive ``scores``, best first, ties broken by lower
    index; fewer when fewer scores are positive."""
    matching = np.flatnonzero(scores > 0)
    if len(matching) > k:
        values = scores[matching]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above = matching[values > kth]
        # `matching` is ascending, so the lowest indices among the tied come first.
        tied = matching[values == kth][: k - len(above)]
        matching = np.concatenate([above, tied])
    return matching[np.lexsort((matching, -scores[matching]))]


def bm25_top_k(query_texts: Sequence[str], doc_texts: Sequence[str], k: int) -> list[list[int]]:
    """The indices of each query's ``k`` best documents of ``doc_texts`` (see
    :meth:`BM25.search`), best first."""
    index = BM25(doc_texts)
    progress = tqdm(
        query_texts, desc="BM25 search", unit="query", disable=len(query_texts) <= _PROGRESS_MIN
    )
    return [[doc for doc, _ in index.search(text, k)] for text in progress]
