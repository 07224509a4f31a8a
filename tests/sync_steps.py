"""Trainer steps with their device->host synchronisations counted, shared by
tests/test_syncs.py (one process) and the 2-rank Gloo check in tests/ddp_worker.py."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from biencoder.data.sts import ScoredPair
from biencoder.data.training import Triplet
from biencoder.data.training_sets import TrainingSet
from biencoder.evaluation.config import EvalConfig
from biencoder.model.biencoder import BiEncoder
from biencoder.runtime.syncs import SyncCounter
from biencoder.training.config import TrainerConfig
from biencoder.training.distributed import Distributed
from biencoder.training.schedules import warmup_schedule
from biencoder.training.tasks import Task
from biencoder.training.trainer import Trainer


def scored_triplets(count: int) -> list[Triplet]:
    """``count`` distinct triplets of varied lengths, with teacher scores, so that every
    task (contrastive, distillation, pairwise) can train on them."""
    words = [
        *("protein", "cell", "virus", "gene", "membrane"),
        *("enzyme", "receptor", "signal", "tissue", "dose"),
    ]
    return [
        Triplet(
            f"what does {words[i % 10]} {i} do in {' '.join(words[: 1 + i % 7])}",
            f"{words[(i + 3) % 10]} {i} binds {' '.join(words[i % 5 :])} in most cells",
            (f"unrelated note {i}", f"{words[i % 10]} {i} is not {words[(i + 1) % 10]}"),
            scores=(0.9, 0.3, 0.1),
        )
        for i in range(count)
    ]


def scored_pairs(count: int) -> list[ScoredPair]:
    """``count`` distinct pairs with gold scores spread over 0-5, for CoSENT."""
    return [
        ScoredPair(t.query, t.positive, 5.0 * i / count)
        for i, t in enumerate(scored_triplets(count))
    ]


def trainer(
    model_path: str,
    task: Task,
    examples: list,
    run_dir: Path,
    *,
    batch_size: int,
    dist: Distributed | None = None,
    **config,
) -> Trainer:
    """A Trainer of the tiny model on ``examples`` with fused AdamW, as on a GPU: the fused
    kernel keeps its step counters on the parameters' device, where the plain one reads
    one per parameter on the host (host tensors on a GPU, so no waiting there, but the
    same calls on the CPU)."""
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(model_path).train()
    return Trainer(
        model,
        task,
        TrainingSet(examples),
        TrainerConfig(batch_size=batch_size, eval=False, prefetch=False, **config),
        EvalConfig(),
        functools.partial(torch.optim.AdamW, lr=1e-4, fused=True),
        warmup_schedule,
        checkpoints=run_dir / "checkpoints",
        logger=None,
        seed=0,
        max_length=32,
        dist=dist,
    )


def count_step_syncs(trainer: Trainer) -> SyncCounter:
    """The synchronisations of one whole step (forward, backward, the read of the loss,
    gradient norm and statistics, the update and its bookkeeping), with the batch prepared
    beforehand as the prefetch thread prepares it."""
    indices = list(range(trainer.config.batch_size))
    prepared = trainer.prepare_batch(indices)
    with SyncCounter() as syncs:
        trainer.train_one_step(prepared, tqdm(disable=True))
    return syncs
