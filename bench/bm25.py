"""BM25 index + search time: our scorer (``retrieval.bm25.BM25``) against ``bm25s``.

    python bench/bm25.py                       # SciFact train queries, then 1M synthetic docs
    python bench/bm25.py --docs 200000         # a smaller synthetic corpus

Both sides get the same words (``retrieval.bm25.tokenize``: lowercased ``\\w+`` minus Lucene's
stop words) and the same parameters (k1=0.9, b=0.4, Lucene's idf), so the comparison is of
the scorers alone; the time includes tokenising, as a caller pays it either way. bm25s runs
with its default numpy backend (numba is not a dependency). Prints each side's seconds, the
ratio ours / bm25s (below 1: ours is faster), the mean overlap of the two top-10 lists and
the largest relative difference between their scores rank by rank (bm25s leaves out
Lucene's constant factor k1 + 1, put back here): where the lists differ while their scores
agree, the difference is the order of tied documents.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import bm25s
import numpy as np

from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR
from biencoder.retrieval.bm25 import BM25, tokenize

K1, B = 0.9, 0.4


# (index seconds, search seconds, per query the (doc, score) hits best first)
Timed = tuple[float, float, list[list[tuple[int, float]]]]


def ours(docs: list[str], queries: list[str], k: int) -> Timed:
    start = time.perf_counter()
    index = BM25(docs, k1=K1, b=B)
    indexed = time.perf_counter()
    ranked = [index.search(query, k) for query in queries]
    return indexed - start, time.perf_counter() - indexed, ranked


def theirs(docs: list[str], queries: list[str], k: int) -> Timed:
    start = time.perf_counter()
    retriever = bm25s.BM25(k1=K1, b=B, method="lucene")
    retriever.index([tokenize(text) for text in docs], show_progress=False)
    indexed = time.perf_counter()
    query_tokens = [tokenize(query) for query in queries]
    ids, scores = retriever.retrieve(query_tokens, k=k, show_progress=False)
    searched = time.perf_counter()
    # bm25s fills k with zero-score documents; ours returns only documents sharing a word.
    ranked = [
        [(int(d), float(s) * (K1 + 1)) for d, s in zip(row, row_scores, strict=True) if s > 0]
        for row, row_scores in zip(ids, scores, strict=True)
    ]
    return indexed - start, searched - indexed, ranked


def agreement(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]], k: int) -> str:
    """Mean |top-k(a) ∩ top-k(b)| / min(k, |top-k(a)|) over queries with any hit, and the
    largest relative score difference at equal ranks."""
    shares, differences = [], [0.0]
    for x, y in zip(a, b, strict=True):
        if x:
            shares.append(len({d for d, _ in x[:k]} & {d for d, _ in y[:k]}) / min(k, len(x)))
            differences += [abs(s - t) / s for (_, s), (_, t) in zip(x[:k], y[:k], strict=False)]
    return (
        f"overlap@{k} {np.mean(shares):.4f}  max relative score difference {max(differences):.1e}"
    )


def compare(name: str, docs: list[str], queries: list[str], k: int = 10) -> None:
    results: dict[str, Timed] = {}
    runners: dict[str, Callable] = {"ours": ours, "bm25s": theirs}
    for label, runner in runners.items():
        results[label] = runner(docs, queries, k)
        index_s, search_s, _ = results[label]
        print(
            f"{name:<10} {label:<6} index {index_s:8.2f} s  search {search_s:8.2f} s  "
            f"total {index_s + search_s:8.2f} s"
        )
    total = {label: index_s + search_s for label, (index_s, search_s, _) in results.items()}
    print(
        f"{name:<10} ratio ours/bm25s: index {results['ours'][0] / results['bm25s'][0]:.2f}  "
        f"search {results['ours'][1] / results['bm25s'][1]:.2f}  "
        f"total {total['ours'] / total['bm25s']:.2f}  "
        + agreement(results["ours"][2], results["bm25s"][2], k)
    )


def synthetic(num_docs: int, num_queries: int, seed: int) -> tuple[list[str], list[str]]:
    """Documents of 20-60 words and queries of 3-8 words drawn from a 200k-word vocabulary
    with Zipf frequencies (exponent 1.1), as in natural text."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(200_000)], dtype=object)
    weights = 1.0 / np.arange(1, len(vocabulary) + 1) ** 1.1
    weights /= weights.sum()

    def texts(count: int, low: int, high: int) -> list[str]:
        lengths = rng.integers(low, high + 1, size=count)
        words = vocabulary[rng.choice(len(vocabulary), size=int(lengths.sum()), p=weights)]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        return [" ".join(words[bounds[i] : bounds[i + 1]]) for i in range(count)]

    return texts(num_docs, 20, 60), texts(num_queries, 3, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic corpus size")
    parser.add_argument("--queries", type=int, default=1000, help="synthetic queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"bm25s {bm25s.__version__}, numpy {np.__version__}, Python {platform.python_version()}")

    train = load_beir(SCIFACT_DIR, "train")
    docs = [doc.full_text for doc in train.corpus.values()]
    queries = [train.queries[q] for q in sorted(train.queries)]
    print(f"SciFact: {len(docs)} docs, {len(queries)} train queries")
    compare("scifact", docs, queries)

    docs, queries = synthetic(args.docs, args.queries, args.seed)
    print(f"synthetic: {len(docs)} docs, {len(queries)} queries")
    compare("synthetic", docs, queries)


if __name__ == "__main__":
    main()
