"""What training reads: examples, plus the dev set that selects checkpoints.

Each spec is a small dataclass that Hydra builds from ``conf/train_data/*.yaml``; its
settings are checked when it is built, before any file is read. ``example_type`` says what
the examples will be (so a loss that cannot use them is refused up front), and
``load(model)`` reads the files (and mines hard negatives, which may need the model).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .beir import BeirDataset, load_beir, subsample_corpus
from .mining.negatives import mine_hard_negatives, triplets_from_beir
from .sts import ScoredPair, load_sts
from .training import (
    Example,
    Pair,
    Triplet,
    load_pairs,
    load_scored_pairs,
    load_triplets,
    pairs_from_beir,
)

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

MINING_METHODS = ("bm25", "dense")
JSONL_FORMATS = ("pairs", "triplets", "scored_pairs")
SAMPLING = ("proportional", "round_robin")


@dataclass
class NamedSet:
    """One set of a several-set run: its name (its key under ``train_data.sets``) and
    examples."""

    name: str
    examples: Sequence[Example]


@dataclass
class TrainingSet:
    """Training examples, the dev set (None without one) and, when they were mined, the hard
    negatives as query id -> doc ids (what a resumed run reuses instead of mining again).

    ``examples`` is any sequence: a list, or rows read lazily (:class:`data.hf.HfExamples`).
    A run on several sets has them in ``sets`` (``examples`` is then their concatenation,
    in that order) and draws each batch from one set as ``sampling`` says; its
    ``negatives`` are keyed by set name.
    """

    examples: Sequence[Example]
    dev: BeirDataset | list[ScoredPair] | None = None
    negatives: dict[str, Any] | None = None
    sets: list[NamedSet] | None = None
    sampling: str = "proportional"


@dataclass
class BeirTrainingSet:
    """(query, relevant document) pairs from a BEIR split, with mined hard negatives.

    ``dev_queries`` of the split's queries (a seeded sample) are held out: they never train,
    and the dev set searches their judged documents among ``dev_corpus_size`` documents
    (the rest random distractors), which keeps dev evaluation cheap on a CPU.
    """

    path: str
    split: str = "train"
    dev_queries: int = 0
    dev_corpus_size: int | None = None
    hard_negatives: int = 0
    mining: str = "bm25"
    mining_depth: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dev_queries < 0:
            raise ValueError(f"dev_queries: must be >= 0, got {self.dev_queries}")
        if self.dev_corpus_size is not None and self.dev_corpus_size < 1:
            raise ValueError(
                f"dev_corpus_size: must be positive or null, got {self.dev_corpus_size}"
            )
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives: must be >= 0, got {self.hard_negatives}")
        if self.mining not in MINING_METHODS:
            raise ValueError(f"mining: {self.mining!r} is not one of {', '.join(MINING_METHODS)}")
        if self.mining_depth < 1:
            raise ValueError(f"mining_depth: must be positive, got {self.mining_depth}")

    def example_type(self) -> type:
        return Triplet if self.hard_negatives > 0 else Pair

    def load(
        self,
        model: BiEncoder | None = None,
        negatives: dict[str, list[str]] | None = None,
    ) -> TrainingSet:
        """Read the split and hold out the dev queries; mine ``hard_negatives`` per pair
        (dense mining embeds with ``model``) unless ``negatives`` gives them already.

        Raises DataError naming the qrels file when the training queries have no relevant
        document (see :func:`load_beir` and :func:`pairs_from_beir`)."""
        full = load_beir(self.path, self.split)
        query_ids = sorted(full.qrels)
        if self.dev_queries >= len(query_ids):
            raise ValueError(
                f"dev_queries: {self.dev_queries} leaves no training "
                f"queries ({len(query_ids)} in {self.split})"
            )
        rng = random.Random(self.seed)
        dev_ids = set(rng.sample(query_ids, self.dev_queries))
        train = _restrict(full, [q for q in query_ids if q not in dev_ids])
        dev = self._dev_set(full, sorted(dev_ids), rng) if dev_ids else None
        # Raises when the training queries have no relevant document, before mining spends
        # minutes on them.
        pairs = pairs_from_beir(train)
        if self.hard_negatives > 0:
            if negatives is None:
                negatives = mine_hard_negatives(
                    train,
                    self.hard_negatives,
                    method=self.mining,
                    depth=self.mining_depth,
                    seed=self.seed,
                    model=model,
                )
            else:
                log.info("reusing the hard negatives of %d queries", len(negatives))
            examples: list[Example] = list(triplets_from_beir(train, negatives))
        else:
            negatives = None
            examples = list(pairs)
        log.info(
            "%s/%s: %d training examples from %d queries; %d dev queries",
            self.path,
            self.split,
            len(examples),
            len(train.qrels),
            len(dev_ids),
        )
        return TrainingSet(examples, dev, negatives)

    def _dev_set(self, full: BeirDataset, dev_ids: list[str], rng: random.Random) -> BeirDataset:
        return subsample_corpus(
            _restrict(full, dev_ids), self.dev_corpus_size or len(full.corpus), rng
        )


@dataclass
class StsTrainingSet:
    """STS Benchmark pairs with gold scores; the dev split selects checkpoints."""

    path: str
    split: str = "train"
    dev_split: str | None = "dev"

    def example_type(self) -> type:
        return ScoredPair

    def load(self, model: BiEncoder | None = None, negatives: None = None) -> TrainingSet:
        dev = load_sts(self.path, self.dev_split) if self.dev_split else None
        return TrainingSet(list(load_sts(self.path, self.split)), dev)


@dataclass
class JsonlTrainingSet:
    """A JSONL file of pairs, triplets or scored pairs (see data/training.py)."""

    path: str
    format: str = "pairs"

    def __post_init__(self) -> None:
        if self.format not in JSONL_FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(JSONL_FORMATS)}")

    def example_type(self) -> type:
        return {"pairs": Pair, "triplets": Triplet, "scored_pairs": ScoredPair}[self.format]

    def load(self, model: BiEncoder | None = None, negatives: None = None) -> TrainingSet:
        readers = {
            "pairs": load_pairs,
            "triplets": load_triplets,
            "scored_pairs": load_scored_pairs,
        }
        return TrainingSet(list(readers[self.format](self.path)))


class ConcatenatedExamples(Sequence[Example]):
    """Several example sequences as one, indexed without copying them."""

    def __init__(self, parts: Sequence[Sequence[Example]]) -> None:
        self.parts = list(parts)
        self.starts = list(itertools.accumulate((len(p) for p in self.parts[:-1]), initial=0))
        self._len = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not 0 <= index < self._len:
            raise IndexError(f"example {index} of {self._len}")
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part][index - self.starts[part]]

    def __iter__(self) -> Iterator[Example]:
        return itertools.chain.from_iterable(self.parts)


@dataclass
class MultiTrainingSet:
    """Several training sets in one run, each batch drawn from one of them so that in-batch
    negatives stay within a set (sentence-transformers' multi-dataset training).

    ``sets`` maps a name (used in ``train/loss/<name>``) to any other training set;
    ``sampling`` picks the set of each batch: ``proportional`` draws every set's batches
    of an epoch in a seeded shuffle (so sets come up in proportion to their size), and
    ``round_robin`` takes the sets in turn, an epoch ending when the smallest runs out.
    The dev set is the first set's that has one, in the order of ``sets``.
    """

    sets: Mapping[str, Any]
    sampling: str = "proportional"

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("sets: no training set given")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        self.sets = dict(self.sets)

    def load(
        self,
        model: BiEncoder | None = None,
        negatives: dict[str, dict[str, list[str]]] | None = None,
    ) -> TrainingSet:
        """Load every set (``negatives`` holds the mined negatives of a resumed run, by set
        name); a set's error is raised again with its name in front (``sets.<name>: ...``)."""
        loaded: dict[str, TrainingSet] = {}
        for name, spec in self.sets.items():
            try:
                loaded[name] = spec.load(model, (negatives or {}).get(name))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"sets.{name}: {err}") from err
            except ValueError as err:
                raise ValueError(f"sets.{name}: {err}") from err
        mined = {name: s.negatives for name, s in loaded.items() if s.negatives is not None}
        dev = next((s.dev for s in loaded.values() if s.dev is not None), None)
        return TrainingSet(
            ConcatenatedExamples([s.examples for s in loaded.values()]),
            dev,
            mined or None,
            [NamedSet(name, s.examples) for name, s in loaded.items()],
            self.sampling,
        )


def _restrict(dataset: BeirDataset, query_ids: list[str]) -> BeirDataset:
    return dataclasses.replace(
        dataset,
        queries={q: dataset.queries[q] for q in query_ids},
        qrels={q: dataset.qrels[q] for q in query_ids},
    )
