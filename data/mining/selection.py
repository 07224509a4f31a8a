"""Which retrieved documents become a query's negatives: sentence-transformers'
``mine_hard_negatives`` options with its meanings (:class:`MiningOptions`), applied to one
query's hits by :func:`select_negatives`."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from biencoder.data.mining.sets import MiningQuery

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
