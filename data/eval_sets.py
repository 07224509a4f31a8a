"""What the final evaluation scores: a BEIR retrieval split or an STS split.

Each spec is a small dataclass that Hydra builds from ``conf/eval_data/*.yaml``; ``load()``
reads the files. Keeping the spec apart from the loading lets the entry points check every
setting before any file is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .beir import BeirDataset, load_beir
from .sts import ScoredPair, load_sts


@dataclass
class BeirEvalSet:
    """The queries of ``split`` in the BEIR folder ``path``, searched over its corpus.

    ``corpus_size`` keeps the judged documents plus seeded random distractors up to that
    many (cheap ablations; scores are then not comparable with full-corpus numbers);
    ``strict`` makes an unknown id in the qrels an error instead of a counted warning.
    """

    path: str
    split: str = "test"
    strict: bool = False
    corpus_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.corpus_size is not None and self.corpus_size < 1:
            raise ValueError(f"corpus_size: must be positive or null, got {self.corpus_size}")

    def load(self) -> BeirDataset:
        return load_beir(
            self.path,
            self.split,
            strict=self.strict,
            corpus_size=self.corpus_size,
            seed=self.seed,
        )


@dataclass
class StsEvalSet:
    """The scored sentence pairs of ``split`` (``sts-{split}.csv``) in the folder ``path``."""

    path: str
    split: str = "test"

    def load(self) -> list[ScoredPair]:
        return load_sts(self.path, self.split)
