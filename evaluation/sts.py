"""Correlation metrics for semantic textual similarity (STS) benchmarks, in numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("x and y must be finite (no NaN or inf)")
    return a, b


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0 or norm_b == 0:
        return float("nan")
    # Normalising before the dot product keeps it accurate for large-magnitude inputs.
    return float(np.clip(np.dot(a / norm_a, b / norm_b), -1.0, 1.0))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.flatnonzero(starts), a.size]
    # Tied values share the mean of the 1-based ranks their group spans.
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation of ``x`` and ``y``; NaN when either is constant (as in scipy)."""
    a, b = _pair(x, y)
    return _pearson(a, b)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the ranks, tied values getting their average rank.

    Equals ``scipy.stats.spearmanr``; NaN when either input is constant.
    """
    a, b = _pair(x, y)
    return _pearson(_average_ranks(a), _average_ranks(b))


def sts_metrics(pred_scores: ArrayLike, gold_scores: ArrayLike) -> dict[str, float]:
    """STS evaluation: ``{"spearman": ..., "pearson": ...}`` of predictions against gold scores.

    Spearman is the headline STS number (as in MTEB / SentEval); Pearson is reported alongside.
    """
    return {
        "spearman": spearman(pred_scores, gold_scores),
        "pearson": pearson(pred_scores, gold_scores),
    }
