"""What training reads: examples, plus the dev set that selects checkpoints.

Each spec is a small dataclass that Hydra builds from ``conf/train_data/*.yaml``;
``load(model)`` reads the files (and mines hard negatives, which may need the model).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .beir import BeirDataset, load_beir, subsample_corpus
from .mining import mine_hard_negatives, triplets_from_beir
from .sts import ScoredPair, load_sts
from .training import (
    Pair,
    Triplet,
    load_pairs,
    load_scored_pairs,
    load_triplets,
    pairs_from_beir,
)

if TYPE_CHECKING:
    from model import BiEncoder

log = logging.getLogger(__name__)

Example = Pair | Triplet | ScoredPair


@dataclass
class TrainingSet:
    examples: list[Example]
    dev: BeirDataset | list[ScoredPair] | None = None


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
    mining: Literal["bm25", "dense"] = "bm25"
    mining_depth: int = 30
    seed: int = 0

    def load(self, model: BiEncoder | None = None) -> TrainingSet:
        full = load_beir(self.path, self.split)
        query_ids = sorted(full.qrels)
        if self.dev_queries >= len(query_ids):
            raise ValueError(
                f"train_data.dev_queries={self.dev_queries} leaves no training "
                f"queries ({len(query_ids)} in {self.split})"
            )
        rng = random.Random(self.seed)
        dev_ids = set(rng.sample(query_ids, self.dev_queries))
        train = _restrict(full, [q for q in query_ids if q not in dev_ids])
        dev = self._dev_set(full, sorted(dev_ids), rng) if dev_ids else None
        if self.hard_negatives > 0:
            negatives = mine_hard_negatives(
                train,
                self.hard_negatives,
                method=self.mining,
                depth=self.mining_depth,
                seed=self.seed,
                model=model,
            )
            examples: list[Example] = list(triplets_from_beir(train, negatives))
        else:
            examples = list(pairs_from_beir(train))
        log.info(
            "%s/%s: %d training examples from %d queries; %d dev queries",
            self.path,
            self.split,
            len(examples),
            len(train.qrels),
            len(dev_ids),
        )
        return TrainingSet(examples, dev)

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

    def load(self, model: BiEncoder | None = None) -> TrainingSet:
        dev = load_sts(self.path, self.dev_split) if self.dev_split else None
        return TrainingSet(list(load_sts(self.path, self.split)), dev)


@dataclass
class JsonlTrainingSet:
    """A JSONL file of pairs, triplets or scored pairs (see data/training.py)."""

    path: str
    format: Literal["pairs", "triplets", "scored_pairs"] = "pairs"

    def load(self, model: BiEncoder | None = None) -> TrainingSet:
        readers = {
            "pairs": load_pairs,
            "triplets": load_triplets,
            "scored_pairs": load_scored_pairs,
        }
        if self.format not in readers:
            raise ValueError(
                f"train_data.format: {self.format!r} is not one of {', '.join(readers)}"
            )
        return TrainingSet(list(readers[self.format](self.path)))


def _restrict(dataset: BeirDataset, query_ids: list[str]) -> BeirDataset:
    return dataclasses.replace(
        dataset,
        queries={q: dataset.queries[q] for q in query_ids},
        qrels={q: dataset.qrels[q] for q in query_ids},
    )
