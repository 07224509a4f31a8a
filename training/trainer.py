"""The training loop: batches, steps, the non-finite policy, dev evaluation, checkpoints.

    trainer = Trainer(model, task, train_set, config, evaluation, optimizer, scheduler,
                      checkpoints=run_dir / "checkpoints", logger=logger, seed=0)
    trainer.load_state_dict(load_trainer_state(path))   # when resuming
    best = trainer.fit()

A :class:`Trainer` holds everything a run changes as it goes (step, optimiser, scheduler,
learnable loss parameters, the sampler's position, random states, the best dev score), and
``state_dict()`` / ``load_state_dict()`` save and restore all of it, so a resumed run goes on
exactly where the stopped one was.

On several processes (``dist`` with ``world_size`` K > 1, started by torchrun or SLURM)
every rank draws the same global batch of ``config.batch_size`` examples, embeds its own
``batch_size / K`` of them through DistributedDataParallel, and gathers what the loss
needs from the others (:meth:`training.tasks.TextBatch.shard_for`): the run is the
single-process run at the same global batch. Rank 0 alone writes checkpoints, metrics
and the progress bar; every rank takes part in evaluations, which encode their share of
the texts (:class:`ShardedEncoder`).

A training set with several ``sets`` (``train_data=multi``) draws each batch from one set
(:class:`data.sampler.MultiSetBatchSampler`) and logs ``train/loss/<set>``, the mean loss of
that set's batches since the previous metrics line, beside ``train/loss``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from biencoder.data.beir import BeirDataset
from biencoder.data.sampler import MultiSetBatchSampler, NoDuplicateBatchSampler
from biencoder.data.training_sets import TrainingSet
from biencoder.evaluation.config import EvalConfig
from biencoder.evaluation.scoring import score, store_folder
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.store import Sharding, entries_of, weights_fingerprint
from biencoder.runtime.device import bf16_supported, matmul_precision
from biencoder.runtime.files import remove
from biencoder.training.checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from biencoder.training.config import TrainerConfig
from biencoder.training.distributed import Distributed, gather
from biencoder.training.loggers import Logger
from biencoder.training.prefetch import Prefetcher
from biencoder.training.step import (
    ColumnEncoder,
    StepResult,
    TokenizedBatch,
    tokenize_batch,
    train_step,
)
from biencoder.training.tasks import Task

log = logging.getLogger("train")

SELECTION_METRIC = {"retrieval": "ndcg@10", "sts": "spearman"}
# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: schedulers read it
# as "terminated", and SLURM's --requeue then starts the job again, to resume.
EXIT_TERMINATED = 128 + signal.SIGTERM


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf (``trainer.on_nonfinite=stop``, or weights that skipping
    a step cannot repair)."""


class Terminated(Exception):
    """SIGTERM arrived (a scheduler's time limit or preemption): save, then exit."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs, so the training loop can
    save ``last`` before the process ends (signal handlers exist in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def all_finite(parameters: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor holds only finite values: one fused reduction (the largest
    magnitude of each tensor, NaN where any value is NaN) and one read, however many
    tensors, since on a GPU each read waits for the device."""
    tensors = [p.detach() for p in parameters]
    if not tensors:
        return True
    largest = torch._foreach_norm(tensors, math.inf)
    return bool(torch.isfinite(torch.stack([m.float() for m in largest])).all())


@dataclass
class StepReport:
    """One step's numbers on the host, over every rank: the mean loss, the gradient norm
    (the same on every rank), the task's statistics averaged over the ranks that define
    them (NaN ones left out), tokens summed and the longest text."""

    loss: float
    grad_norm: float
    stats: dict[str, float]
    tokens: int
    seq_len_max: int


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    # bf16 autocast on a CPU without bf16 units is slower than fp32, so auto means CUDA only.
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        if device.type == "cpu" and not bf16_supported(device):
            log.warning(
                "trainer.precision=bf16: this CPU has no bf16 instructions (AVX-512-BF16 or "
                "AMX), so bf16 is emulated and slower than fp32"
            )
        return torch.bfloat16
    return None


def compile_towers(model: BiEncoder) -> None:
    """Compiles each tower (encoder, pooling, projection) in place with ``torch.compile``,
    for training and ``encode`` alike. In place, so parameter names, checkpoints and DDP
    see the same module; dynamic shapes, since every batch pads to its own length."""
    for tower in {id(t): t for t in (model.query_tower, model.tower("doc"))}.values():
        tower.compile(dynamic=True)


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    params: list[torch.nn.Parameter],
    device: torch.device,
) -> torch.optim.Optimizer:
    """``factory(params)``; an optimiser configured with ``fused: null`` (AdamW's default in
    conf/optim) gets torch's fused kernel on CUDA, one launch per step instead of several
    per parameter, and the plain one elsewhere."""
    if getattr(factory, "keywords", {}).get("fused", False) is None:
        return factory(params, fused=device.type == "cuda")
    return factory(params)


@dataclass
class PreparedBatch:
    """A batch ready for its step, the sampler's state right after drawing it, and the
    name of the training set it came from (None in a one-set run)."""

    tokenized: TokenizedBatch
    sampler_state: dict[str, Any]
    set_name: str | None = None


def example_texts(example) -> tuple[str, ...]:
    if hasattr(example, "query"):
        return (example.query, example.positive, *getattr(example, "negatives", ()))
    return (example.text1, example.text2)


def batch_sampler(
    train_set: TrainingSet, batch_size: int, seed: int
) -> NoDuplicateBatchSampler | MultiSetBatchSampler:
    """The duplicate-free batch sampler over ``train_set``; over its ``sets``, one per set
    drawn from as ``train_set.sampling`` says. Raises a ValueError naming the set when a
    set cannot fill a single batch."""
    if train_set.sets is None:
        sampler = NoDuplicateBatchSampler(
            [example_texts(e) for e in train_set.examples], batch_size, seed=seed
        )
        if len(sampler) == 0:
            raise ValueError(f"batch_size: {sampler.explain_empty_epoch()}")
        return sampler
    samplers = []
    for part in train_set.sets:
        # One seed for every set: each set's order is its own permutation already.
        sampler = NoDuplicateBatchSampler(
            [example_texts(e) for e in part.examples], batch_size, seed=seed
        )
        if len(sampler) == 0:
            raise ValueError(
                f"batch_size: training set {part.name!r}: {sampler.explain_empty_epoch()}"
            )
        samplers.append(sampler)
    return MultiSetBatchSampler(samplers, train_set.sampling, seed)


def endless_batches(
    sampler: NoDuplicateBatchSampler | MultiSetBatchSampler,
) -> Iterator[list[int]]:
    """Batches across epochs: each pass over the sampler ends by moving it to its next
    epoch, and its state says where a resumed run continues."""
    while True:
        yield from sampler


class ShardedEncoder:
    """``model`` for the evaluators, with ``encode`` split across ranks: each encodes a
    contiguous share of the texts and every rank gets all the embeddings back, in order.
    Everything else is the model's."""

    def __init__(self, model: BiEncoder, dist: Distributed) -> None:
        self.model = model
        self.dist = dist

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode(self, texts: list[str], *args, show_progress: bool | None = None, **kwargs):
        count = len(texts)
        per_rank = -(-count // self.dist.world_size)
        start = min(self.dist.rank * per_rank, count)
        stop = min(start + per_rank, count)
        mine = self.model.encode(
            texts[start:stop], *args, show_progress=show_progress and self.dist.is_main, **kwargs
        )
        return gather(mine.to(self.dist.device), self.dist).cpu()


class Trainer:
    """Trains ``model`` with ``task`` on ``train_set`` as ``config`` says (see the module
    docstring); ``optimizer`` and ``scheduler`` are factories (Hydra partials) called on the
    parameters and the run's length. ``max_length`` is the token limit of a training text;
    ``store`` is the embedding store dev evaluations write (``retrieval.store``; None
    embeds in memory); ``logger`` receives the metrics (on rank 0; pass None elsewhere);
    ``run_id`` is the W&B run id a resumed run continues."""

    def __init__(
        self,
        model: BiEncoder,
        task: Task,
        train_set: TrainingSet,
        config: TrainerConfig,
        evaluation: EvalConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        *,
        checkpoints: Path,
        logger: Logger | None,
        seed: int,
        max_length: int,
        run_id: str | None = None,
        dist: Distributed | None = None,
        store: Path | None = None,
    ) -> None:
        self.model, self.task, self.train_set = model, task, train_set
        self.config, self.evaluation = config, evaluation
        self.checkpoints, self.logger, self.run_id = checkpoints, logger, run_id
        self.max_length = max_length
        self.dist = dist or Distributed(device=model.device)
        self.sampler = batch_sampler(train_set, config.batch_size, seed)
        self.total_steps = config.max_steps or config.epochs * len(self.sampler)
        self.params = [p for p in (*model.parameters(), *task.parameters()) if p.requires_grad]
        self.optimizer = build_optimizer(optimizer, self.params, model.device)
        self.scheduler = scheduler(self.optimizer, num_training_steps=self.total_steps)
        dev_kind = "retrieval" if isinstance(train_set.dev, BeirDataset) else "sts"
        self.selection = SELECTION_METRIC[dev_kind]
        self.autocast = autocast_dtype(config.precision, model.device)
        self.step = 0
        # Where the sampler stood after the batch last trained on: with prefetching, the
        # sampler itself is one batch further.
        self.sampler_state = self.sampler.state_dict()
        # A fast tokenizer sets truncation on itself for every call: the prefetch thread and
        # a dev evaluation (another max_length) must not use it at the same time.
        self.tokenizer_lock = threading.Lock()
        self.best: dict[str, float] | None = None
        self.nonfinite_steps = 0
        # Whether the model's size and the optimiser's state were reported (after the first
        # update, which creates that state).
        self.sized = False
        # The statistics' names, checked to be every rank's once, at the first step.
        self.stat_keys: list[str] | None = None
        # Each set's step losses since the last metrics line, for train/loss/<set>.
        self.set_losses: dict[str, list[float]] = {}
        # The embedding store of dev evaluations, and the weights its entries were made by.
        self.store = store_folder(evaluation, store)
        self.best_fingerprint: str | None = None
        self.dev_fingerprints: set[str] = set()
        self.encoder = ColumnEncoder(model)
        if self.dist.enabled:
            # A tower that a GradCache chunk does not use has parameters DDP must not wait for.
            unused = config.cache_chunk_size is not None and not model.config.shared
            self.encoder = DistributedDataParallel(
                self.encoder,
                device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )

    def _prune_store(self, current: str) -> None:
        """Delete the store entries of this run's earlier dev evaluations, but the best's:
        a large dev corpus would otherwise fill the disk one copy per evaluation."""
        keep = {current, self.best_fingerprint}
        for stale in self.dev_fingerprints - keep:
            for path in entries_of(self.store, stale):
                remove(path)
        self.dev_fingerprints = keep - {None}

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores besides the model. Random states are every rank's."""
        return {
            "step": self.step,
            "best": self.best,
            "wandb_run_id": self.run_id,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "task": self.task.state_dict(),
            "sampler": self.sampler_state,
            "rng": self.dist.all_gather_objects(rng_state()),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state["task"])
        self.sampler.load_state_dict(state["sampler"])
        self.sampler_state = self.sampler.state_dict()
        states = state["rng"]
        if len(states) != self.dist.world_size:
            log.warning(
                "the checkpoint holds random states for %d ranks, this run has %d: dropout "
                "masks will differ from the interrupted run's",
                len(states),
                self.dist.world_size,
            )
        set_rng_state(states[min(self.dist.rank, len(states) - 1)])
        self.step, self.best = state["step"], state["best"]
        self.run_id = state.get("wandb_run_id")
        self.nonfinite_steps = state.get("nonfinite_steps", 0)

    # ------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, float] | None:
        """Train to ``total_steps``, evaluating on the dev set and saving as configured, then
        save ``last``; returns the best dev ``{"step", "value"}`` (None without a dev set).
        Raises :class:`NonFiniteError` or :class:`Terminated` (SIGTERM) after saving what
        can be saved; Ctrl-C saves ``last`` too."""
        self.model.train()
        batches = endless_batches(self.sampler)

        def prepare() -> PreparedBatch:
            return self.prepare_batch(next(batches))

        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.dist.is_main,
        )
        # SIGTERM during training becomes Terminated and is saved like Ctrl-C.
        with (
            sigterm_raises(),
            matmul_precision(self.config.tf32),
            Prefetcher(prepare, enabled=self.config.prefetch) as prepared,
        ):
            try:
                while self.step < self.total_steps:
                    self.train_one_step(next(prepared), progress)
            except (KeyboardInterrupt, Terminated) as stop:
                how = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated"
                log.warning("%s at step %d: saving checkpoints/last first", how, self.step)
                if all_finite(self.params):
                    self.checkpoint("last")
                raise
            finally:
                progress.close()
        every = self.config.eval_every
        if self.train_set.dev is not None and (not every or self.step % every):
            self.evaluate_dev()
        self.checkpoint("last")
        return self.best

    def prepare_batch(self, indices: list[int]) -> PreparedBatch:
        """The training examples at ``indices`` as a batch ready for :meth:`train_one_step`:
        this rank's shard, tokenized, with the packing and counts the step needs from the
        host. The sampler's state is read as it is now (right after drawing ``indices``).
        Safe to run on another thread during a step."""
        batch = self.task.make_batch([self.train_set.examples[i] for i in indices])
        if self.dist.enabled:
            batch = batch.shard_for(self.dist)
        with self.tokenizer_lock:
            tokenized = tokenize_batch(
                self.model,
                batch,
                self.config.cache_chunk_size,
                self.max_length,
                self.config.cache_chunk_tokens,
            )
        set_name = None
        if self.train_set.sets is not None:
            set_name = self.train_set.sets[self.sampler.set_of(indices[0])].name
        return PreparedBatch(tokenized, self.sampler.state_dict(), set_name)

    def train_one_step(self, prepared: PreparedBatch, progress: tqdm) -> None:
        """One batch: forward, backward, update (or the non-finite policy), log, evaluate on
        the dev set and save when their turns come."""
        config = self.config
        start = time.perf_counter()
        result = train_step(
            self.model,
            self.task,
            prepared.tokenized,
            autocast=self.autocast,
            cache_chunk_size=config.cache_chunk_size,
            cache_chunk_tokens=config.cache_chunk_tokens,
            max_length=self.max_length,
            encoder=self.encoder,
        )
        self.sampler_state = prepared.sampler_state
        # DDP averages the model's gradients; the task's (a learnable temperature) too.
        self.dist.average_gradients(self.task.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip or math.inf)
        # Every rank reads the same gathered numbers, hence takes the same branch.
        report = self.read_step(result, grad_norm)
        loss = report.loss
        if prepared.set_name is not None:
            self.set_losses.setdefault(prepared.set_name, []).append(loss)
        if math.isfinite(loss) and math.isfinite(report.grad_norm):
            self.optimizer.step()
        else:
            self._nonfinite(loss, report.grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.sized:
            self.log_sizes()
        self.step += 1
        elapsed = time.perf_counter() - start
        examples_per_s = config.batch_size / elapsed
        progress.update()
        progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_s:.1f}")
        if self.step % config.log_every == 0:
            self.log(
                {
                    "train/loss": loss,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": report.grad_norm,
                    "train/nonfinite_steps": self.nonfinite_steps,
                    "train/examples_per_s": examples_per_s,
                    "train/tokens": report.tokens,
                    "train/tokens_per_s": report.tokens / elapsed,
                    "train/seq_len_max": report.seq_len_max,
                    "train/epoch": self.sampler_state["epoch"],
                    "train/world_size": self.dist.world_size,
                    # A set's mean since the last line: with log_every > 1 the logged step
                    # alone would show some sets never (round robin) or rarely.
                    **{
                        f"train/loss/{name}": sum(losses) / len(losses)
                        for name, losses in self.set_losses.items()
                    },
                    **{f"train/{k}": v for k, v in report.stats.items()},
                }
            )
            self.set_losses.clear()
        every = config.eval_every
        if self.train_set.dev is not None and every and self.step % every == 0:
            self.evaluate_dev()
        if self.step % config.save_every == 0:
            self.checkpoint(f"step-{self.step:08d}", prune=True)

    def read_step(self, result: StepResult, grad_norm: torch.Tensor) -> StepReport:
        """The step's numbers, read from the device in one transfer (with several ranks,
        after one all-gather): the step's single synchronisation. Everything the loop
        decides or logs comes from here, so that nothing else in a step waits for the GPU."""
        keys = sorted(result.stats)
        if self.stat_keys is None:
            # Rows of different lengths would be mixed up, or hang, in the all-gather.
            every = self.dist.all_gather_objects(keys)
            if any(other != keys for other in every):
                listed = "; ".join(f"rank {r}: {k}" for r, k in enumerate(every))
                raise ValueError(f"the task's statistics differ between ranks ({listed})")
            self.stat_keys = keys
        device_values = [result.loss, grad_norm, *(result.stats[k] for k in keys)]
        values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in device_values])
        if self.dist.enabled:
            counts = torch.tensor([result.tokens, result.seq_len_max], dtype=torch.float64)
            values = torch.cat([values, counts.to(values.device, non_blocking=True)])
        rows = self.dist.gather_rows(values)
        columns = list(zip(*rows, strict=True))
        stats = {}
        for key, per_rank in zip(keys, columns[2 : 2 + len(keys)], strict=True):
            present = [v for v in per_rank if not math.isnan(v)]
            if present:
                stats[key] = sum(present) / len(present)
        tokens, longest = result.tokens, result.seq_len_max
        if self.dist.enabled:
            tokens, longest = int(sum(columns[-2])), int(max(columns[-1]))
        return StepReport(
            loss=sum(columns[0]) / len(rows),
            grad_norm=columns[1][0],
            stats=stats,
            tokens=tokens,
            seq_len_max=longest,
        )

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        """Stop, or skip this step's update, as ``trainer.on_nonfinite`` says."""
        self.nonfinite_steps += 1
        what = f"step {self.step + 1}: loss {loss}, gradient norm {grad_norm}"
        advice = "lower optim.lr, set trainer.grad_clip, or use trainer.on_nonfinite=skip"
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{what}; training stopped. {self._last_good()} To go on: {advice}."
            )
        if not all_finite(self.params):
            # Skipping cannot help once the weights themselves are NaN: every step would fail.
            raise NonFiniteError(f"{what} and the weights hold NaN or inf. {self._last_good()}")
        log.warning("%s; update skipped (%d so far)", what, self.nonfinite_steps)

    def _last_good(self) -> str:
        found = latest_checkpoint(self.checkpoints)
        if found is None:
            return "No checkpoint was written before."
        return f"The last good checkpoint is {found}."

    # -------------------------------------------------------------------- outputs

    def log_sizes(self) -> None:
        """Log and summarise the trainable and total parameter counts and the bytes the
        optimiser keeps per trainable parameter (AdamW: two moments), what LoRA saves."""
        self.sized = True
        modules = (self.model, self.task)
        total = sum(p.numel() for m in modules for p in m.parameters())
        trainable = sum(p.numel() for p in self.params)
        state = sum(
            v.numel() * v.element_size()
            for s in self.optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        log.info(
            "trainable parameters: %d of %d (%.2f%%); optimizer state: %.1f MiB",
            trainable,
            total,
            100 * trainable / total,
            state / 2**20,
        )
        if self.logger is not None:
            self.logger.summary(
                {
                    "model/parameters": total,
                    "model/trainable_parameters": trainable,
                    "train/optimizer_state_bytes": state,
                }
            )

    def log(self, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, self.step)

    def checkpoint(self, name: str, prune: bool = False) -> Path:
        """Save the model and the trainer state as ``checkpoints/name`` (rank 0 writes;
        every rank calls, to contribute its random state)."""
        # A checkpoint with NaN weights would be resumed from, evaluated and shipped as if good.
        if not all_finite(self.params):
            raise NonFiniteError(
                f"step {self.step}: the weights hold NaN or inf; refusing to write "
                f"{self.checkpoints / name}. {self._last_good()}"
            )
        state = self.state_dict()
        path = self.checkpoints / name
        if self.dist.is_main:
            save_checkpoint(self.checkpoints, name, self.model, state)
            if prune:
                prune_checkpoints(self.checkpoints, keep=self.config.keep_checkpoints)
        # No rank reads a checkpoint before it is complete.
        self.dist.barrier()
        return path

    def evaluate_dev(self) -> None:
        """Score the dev set; a new best is saved as ``checkpoints/best``. A retrieval dev
        set's embeddings go to the store (each rank encodes its own shards); those of
        earlier evaluations this run made are deleted unless they are the best's, which
        the final evaluation of ``best`` then reuses."""
        retrieval = isinstance(self.train_set.dev, BeirDataset)
        model = self.model
        if self.dist.enabled and not retrieval:
            model = ShardedEncoder(self.model, self.dist)
        sharding = Sharding(self.dist.rank, self.dist.world_size, self.dist.barrier)
        with self.tokenizer_lock:
            metrics, timings, _ = score(
                model,
                self.train_set.dev,
                self.evaluation,
                self.evaluation.matryoshka_dims,
                store=self.store,
                sharding=sharding,
            )
        self.model.train()
        self.log({f"dev/{k}": v for k, v in (metrics | timings).items()})
        value = metrics[self.selection]
        fingerprint = weights_fingerprint(self.model) if retrieval and self.store else None
        if self.best is None or value > self.best["value"]:
            self.best = {"step": self.step, "value": value}
            self.best_fingerprint = fingerprint
            self.checkpoint("best")
        if fingerprint is not None and self.dist.is_main:
            self._prune_store(fingerprint)
        log.info(
            "step %d: dev %s %.4f (best %.4f at step %d)",
            self.step,
            self.selection,
            value,
            self.best["value"],
            self.best["step"],
        )
