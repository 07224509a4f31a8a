"""``train_data=synthetic``: training on queries a language model writes for a corpus
without any, synthesised when the run starts and cached by their settings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from biencoder.data.synthesis.run import SynthesisConfig, run_synthesis
from biencoder.data.training import Pair, Triplet, load_pairs, load_triplets
from biencoder.data.training_sets import TrainingSet

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where ``train_data=synthetic`` keeps its files unless told: $BIENCODER_CACHE, or
    ~/.cache/biencoder (under $XDG_CACHE_HOME when set), /synthetic."""
    root = (
        os.environ.get("BIENCODER_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biencoder"
    )
    return Path(root) / "synthetic"


@dataclass
class SyntheticTrainingSet:
    """Pairs (triplets with ``synthesis.negatives.num``) written by a language model for a
    corpus without queries, synthesised when the run starts (see :func:`run_synthesis`).

    The file is ``file``, or ``cache_dir/<corpus>-<hash of the settings>.jsonl``: a run
    with the same settings reuses it, one that crashed mid-synthesis continues it, and a
    larger ``num_docs`` extends it. No dev set: the last checkpoint is evaluated.
    """

    synthesis: SynthesisConfig
    file: str | None = None  # null: a file in cache_dir named by the settings
    cache_dir: str | None = None  # null: default_cache_dir()

    def __post_init__(self) -> None:
        if not isinstance(self.synthesis, SynthesisConfig):
            raise ValueError(
                f"synthesis: expected a SynthesisConfig, got {type(self.synthesis).__name__}"
            )

    def output(self) -> Path:
        """Where the synthetic pairs are (or will be) written."""
        if self.file:
            return Path(self.file)
        digest = hashlib.sha256(json.dumps(self.synthesis.settings(), sort_keys=True).encode())
        name = Path(self.synthesis.corpus.path).name.removesuffix(".gz").removesuffix(".jsonl")
        folder = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return folder / f"{name}-{digest.hexdigest()[:12]}.jsonl"

    def example_type(self) -> type:
        return Triplet if self.synthesis.negatives.num else Pair

    def load(self, model: BiEncoder | None = None, negatives: None = None) -> TrainingSet:
        import torch
        import torch.distributed as dist

        out = self.output()
        # One process writes; the others wait for it, then read.
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            # Sampling draws from torch's global generator, which training then uses: a
            # run that generates must train as one that found the file in the cache.
            with torch.random.fork_rng():
                run_synthesis(self.synthesis, out, resume=True)
        if distributed:
            dist.barrier()
        log.info("training on %s", out)
        reader = load_triplets if self.synthesis.negatives.num else load_pairs
        return TrainingSet(list(reader(out)))
