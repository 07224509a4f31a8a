"""What a synthesis run generates per document and keeps: :class:`SynthesisOptions`, with the
filters' and the hard negatives' options."""

from __future__ import annotations

from dataclasses import dataclass, field

from biencoder.data.mining.selection import MiningOptions
from biencoder.data.synthesis.filters import FilterOptions


@dataclass
class NegativeOptions:
    """Hard negatives for each kept pair, mined from the whole corpus by ``retriever``
    (bm25 or dense) with :class:`data.mining.selection.MiningOptions`' meanings; ``num: 0`` writes
    pairs."""

    num: int = 0
    retriever: str = "bm25"
    range_min: int = 0
    range_max: int | None = None
    relative_margin: float | None = None
    sampling: str = "top"

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ValueError(f"num: must be >= 0, got {self.num}")
        if self.retriever not in ("bm25", "dense"):
            raise ValueError(f"retriever: {self.retriever!r} is not one of bm25, dense")
        if self.num:
            self.mining_options()

    def mining_options(self, seed: int = 0) -> MiningOptions:
        return MiningOptions(
            num_negatives=self.num,
            range_min=self.range_min,
            range_max=self.range_max,
            relative_margin=self.relative_margin,
            sampling=self.sampling,
            output_format="n-tuple",
            seed=seed,
        )


@dataclass
class SynthesisOptions:
    """What to generate per document and what to keep (see :mod:`data.synthesis.pipeline`)."""

    num_queries: int = 3
    batch_size: int = 8  # documents per generate() call
    max_doc_words: int | None = 160  # the document is cut to this many words in the prompt
    num_examples: int | None = 0  # few-shot examples from the prompt file; null: all
    max_query_words: int | None = None  # asks the model for queries this short
    save_rejected: bool = False  # also write what the filters removed, and why
    seed: int = 0
    filters: FilterOptions = field(default_factory=FilterOptions)
    negatives: NegativeOptions = field(default_factory=NegativeOptions)

    def __post_init__(self) -> None:
        for key in ("num_queries", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("max_doc_words", "max_query_words"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be positive or null, got {value}")
        if self.num_examples is not None and self.num_examples < 0:
            raise ValueError(f"num_examples: must be >= 0 or null, got {self.num_examples}")
