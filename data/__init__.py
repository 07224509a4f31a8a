"""Data loading and validation: BEIR retrieval sets, STS Benchmark, training files, 🤗
datasets (memory-mapped), and several training sets in one run.

``BUNDLED_DIR`` holds compressed copies of SciFact (BEIR layout) and the STS Benchmark, so a
fresh clone can train and evaluate without downloads; see ``bundled/README.md`` for sources
and licences.
"""

from pathlib import Path

from .beir import BeirDataset, Document, load_beir, load_corpus, subsample_corpus
from .errors import DataError
from .eval_sets import BeirEvalSet, StsEvalSet
from .hf import HfExamples, HfTrainingSet
from .io import iter_jsonl, open_text, resolve
from .mining import BM25, mine_hard_negatives, triplets_from_beir
from .sampler import MultiSetBatchSampler, NoDuplicateBatchSampler
from .sts import ScoredPair, load_sts
from .synthetic import SyntheticTrainingSet
from .training import (
    LabelledText,
    Pair,
    Triplet,
    load_labelled,
    load_pairs,
    load_scored_pairs,
    load_triplets,
    pairs_from_beir,
)
from .training_sets import (
    BeirTrainingSet,
    JsonlTrainingSet,
    MultiTrainingSet,
    StsTrainingSet,
    TrainingSet,
)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SCIFACT_DIR = BUNDLED_DIR / "scifact"
STSB_DIR = BUNDLED_DIR / "stsbenchmark"
# 100 SciFact train and 10 test queries with 158 abstracts, 40 STS-B pairs per split: debug=tiny.
TINY_DIR = BUNDLED_DIR / "tiny"

__all__ = [
    "BM25",
    "BUNDLED_DIR",
    "SCIFACT_DIR",
    "STSB_DIR",
    "TINY_DIR",
    "BeirDataset",
    "BeirEvalSet",
    "BeirTrainingSet",
    "DataError",
    "Document",
    "HfExamples",
    "HfTrainingSet",
    "JsonlTrainingSet",
    "LabelledText",
    "MultiSetBatchSampler",
    "MultiTrainingSet",
    "NoDuplicateBatchSampler",
    "Pair",
    "ScoredPair",
    "StsEvalSet",
    "StsTrainingSet",
    "SyntheticTrainingSet",
    "TrainingSet",
    "Triplet",
    "iter_jsonl",
    "load_beir",
    "load_corpus",
    "load_labelled",
    "load_pairs",
    "load_scored_pairs",
    "load_sts",
    "load_triplets",
    "mine_hard_negatives",
    "open_text",
    "pairs_from_beir",
    "resolve",
    "subsample_corpus",
    "triplets_from_beir",
]
