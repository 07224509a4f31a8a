"""Host time of a training step on the CPU: our ``Trainer`` against sentence-transformers.

A tiny encoder (``EncoderConfig.tiny``: 2 layers, 32 wide, BERT's vocabulary, MiniLM's
tokenizer) keeps the model's arithmetic small, so that the host's own work (tokenization,
packing, Python and op dispatch, the optimizer) weighs as much as it can; the report says
how much of a step the arithmetic still takes. Both libraries load the same
randomly initialised folder, truncate to ``--max-length`` tokens and train on the same
batches of ``--batch-size`` SciFact train pairs (query, judged abstract's title and text)
with fused AdamW (lr 2e-5; transformers' default ``adamw_torch_fused``), fp32:

* ours: ``Trainer.train_one_step`` on the batch that ``Trainer.prepare_batch`` tokenized
  on the step's own thread (the prefetch thread's work, not hidden here), InfoNCE
  (temperature 0.05), GradCache chunks of ``--chunk-size`` texts (``cache_chunk_size``)
  or of ``--chunk-tokens`` padded tokens (``cache_chunk_tokens``, texts grouped by
  length; default chunk size × max length, the largest a chunk of ``--chunk-size``
  texts can be, so both bound a pass's activations alike); gradient clipping at 1, the
  warm-up schedule, one read of the step's numbers, as the trainer always does;
* sentence-transformers: what its trainer does per step with ``dataloader_num_workers=0``:
  ``model.preprocess`` of each column on the main thread (its collator), the features
  moved to the device, ``CachedMultipleNegativesRankingLoss`` (scale 20,
  ``mini_batch_size`` = ``--chunk-size``, and for the token-budget job
  ``mini_batch_num_tokens`` = ``--chunk-tokens``, which counts unpadded tokens) forward
  and backward, the NaN/inf check of the loss, gradient clipping at 1, the optimizer and
  linear schedule steps, ``zero_grad``. Callbacks, logging and accelerate's wrappers are
  left out.

The jobs take turns step by step (so that a machine slowing down weighs on all alike):
``--warmup`` untimed steps each, one counted step, then ``--steps`` timed steps. Reported
per job:

* seconds per 1,000 examples (the median timed step, tokenization included) and its ratio
  to sentence-transformers with the same chunking (the issue's target: ours at most 0.5×);
* synchronisations and aten ops per step, counted in the counted step around everything
  after tokenization (which reads host memory only): ``runtime.syncs.SyncCounter``, and
  a dispatch mode that sees every op, backward included;
* where a step's time goes, in seconds per 1,000 examples and as a share of the mean
  timed step: tokenization (``prepare_batch``: examples to a batch, tokens and packing,
  less the packing; or ``preprocess`` of both columns), packing (ours:
  ``Packing.from_mask``, the host-side index arithmetic per chunk) and the optimizer's
  ``step``, each timed with ``time.perf_counter``; the self time of the aten ops of the
  rest of the step (forward, backward, loss, clipping: kernels and their C++ dispatch),
  from ``torch.profiler`` around the timed steps (started and stopped outside the timed
  span); and Python with op dispatch, the remainder.

A pair of the SciFact train qrels is kept when neither its query nor its abstract is in an
earlier kept pair, so a pass over them repeats no text; the passes after the first start
every text with the pass number ("2 ..."), so that no batch repeats a text either, which
the Trainer's sampler checks when it is built.

Examples (the issue's sizes; a quick check)::

    python bench/host_overhead.py --out bench/results/host_overhead.md
    python bench/host_overhead.py --batch-size 64 --chunk-size 16 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import device_name, package_version
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR
from biencoder.data.training import Pair, pairs_from_beir
from biencoder.data.training_sets import TrainingSet
from biencoder.evaluation.config import EvalConfig
from biencoder.model.bert import Packing
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import packaged_model_path, save_random_bert
from biencoder.runtime.syncs import SyncCounter
from biencoder.training.config import TrainerConfig
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.schedules import warmup_schedule
from biencoder.training.trainer import Trainer

TEMPERATURE = 0.05
LEARNING_RATE = 2e-5
MAX_GRAD_NORM = 1.0
# The label of the part of a step after its tokenization, in the profiler's events.
DEVICE_WORK = "host_overhead: after tokenization"
# The issue's target: ours at most half of sentence-transformers' time per example.
TARGET = 0.5


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="examples per step")
    parser.add_argument("--chunk-size", type=int, default=256, help="texts per encoder pass")
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        help="tokens per encoder pass for the token-budget jobs (default: chunk size × max length)",
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text, at most")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per job first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per job")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.chunk_tokens is None:
        args.chunk_tokens = args.chunk_size * args.max_length
    for name in ("chunk_size", "chunk_tokens", "max_length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (in-batch negatives)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# ------------------------------------------------------------------------------------------
# Data and model.
# ------------------------------------------------------------------------------------------


def scifact_pairs() -> list[Pair]:
    """SciFact's train pairs, each kept only if neither text was in an earlier kept one."""
    seen: set[str] = set()
    pairs = []
    for pair in pairs_from_beir(load_beir(SCIFACT_DIR, "train")):
        if pair.query not in seen and pair.positive not in seen:
            seen.update((pair.query, pair.positive))
            pairs.append(pair)
    return pairs


def cycled(pairs: list[Pair], count: int) -> list[Pair]:
    """``count`` examples passing over ``pairs`` again and again; pass k > 1 starts every
    text with "k ", so that no two examples share a text."""
    examples = []
    for index in range(count):
        number, pair = divmod(index, len(pairs))
        pair = pairs[pair]
        if number:
            pair = Pair(f"{number + 1} {pair.query}", f"{number + 1} {pair.positive}")
        examples.append(pair)
    return examples


def build_model_folder(root: Path, max_length: int) -> Path:
    """The tiny BERT, randomly initialised, with MiniLM's tokenizer: both libraries load it."""
    # Attention dropout off, as the project's trainer sets it (trainer.attention_dropout);
    # in the folder's config, so both libraries train alike.
    config = EncoderConfig.tiny(
        max_position_embeddings=max(512, max_length), attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    return save_random_bert(root / "model", Path(packaged_model_path()), config)


# ------------------------------------------------------------------------------------------
# Timing and counting.
# ------------------------------------------------------------------------------------------


class Phases:
    """Seconds spent in named parts of the current step."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.timing(name):
                return function(*args, **kwargs)

        return timed


@contextlib.contextmanager
def timed_packing(phases: Phases) -> Iterator[None]:
    """``Packing.from_mask``, which the tokenizing code calls per chunk, timed as packing."""
    original = Packing.__dict__["from_mask"]
    Packing.from_mask = staticmethod(phases.wrap("packing", Packing.from_mask))
    try:
        yield
    finally:
        Packing.from_mask = original


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_seconds(prof: torch.profiler.profile) -> float:
    """Seconds inside aten ops (their self time: kernels and C++ dispatch) in the part of
    the step labelled ``DEVICE_WORK``, the optimizer's step excepted."""
    total = 0.0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if DEVICE_WORK in ancestors and not any(a.startswith("Optimizer.step") for a in ancestors):
            total += event.self_cpu_time_total
    return total / 1e6


@dataclass
class Result:
    """One job's measurements: each timed step's seconds and phases, and what the counted
    step counted."""

    steps: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    syncs: SyncCounter | None = None
    ops: int = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        # The op counter first, so that the sync counter names the caller of each sync.
        with OpCounter() as ops, SyncCounter() as syncs:
            yield
        self.syncs, self.ops = syncs, ops.count


# A job's step: trains on the examples at these indices, entering the context manager the
# factory gives around everything after tokenization.
Step = Callable[[list[int], Callable[[], contextlib.AbstractContextManager]], None]


# ------------------------------------------------------------------------------------------
# The jobs.
# ------------------------------------------------------------------------------------------


def our_step(
    folder: Path,
    examples: list[Pair],
    chunking: dict,
    args: argparse.Namespace,
    total_steps: int,
    run_dir: Path,
    phases: Phases,
) -> Step:
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(folder, max_length=args.max_length).train()
    trainer = Trainer(
        model,
        InfoNCETask(temperature=TEMPERATURE),
        TrainingSet(examples),
        TrainerConfig(
            batch_size=args.batch_size,
            max_steps=total_steps,
            eval=False,
            save_every=total_steps + 1,
            **chunking,
        ),
        EvalConfig(),
        functools.partial(torch.optim.AdamW, lr=LEARNING_RATE, fused=True),
        warmup_schedule,
        checkpoints=run_dir / "checkpoints",
        logger=None,
        seed=0,
        max_length=args.max_length,
    )
    trainer.optimizer.step = phases.wrap("optimizer", trainer.optimizer.step)
    progress = tqdm(disable=True)

    def step(indices: list[int], around_device_work) -> None:
        with phases.timing("tokenization"):
            prepared = trainer.prepare_batch(indices)
        with around_device_work():
            trainer.train_one_step(prepared, progress)

    return step


def st_step(
    folder: Path,
    examples: list[Pair],
    chunking: dict,
    args: argparse.Namespace,
    total_steps: int,
    phases: Phases,
) -> Step:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = SentenceTransformer(str(folder), device=str(device))
    model.max_seq_length = args.max_length
    model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, **chunking)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    optimizer.step = phases.wrap("optimizer", optimizer.step)

    def step(indices: list[int], around_device_work) -> None:
        batch = [examples[i] for i in indices]
        with phases.timing("tokenization"):
            columns = [
                model.preprocess([e.query for e in batch]),
                model.preprocess([e.positive for e in batch]),
            ]
        with around_device_work():
            features = [
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
                for c in columns
            ]
            loss = loss_fn(features, None)
            loss.backward()
            if torch.isnan(loss) or torch.isinf(loss):
                raise FloatingPointError(f"sentence-transformers' loss is {loss.item()}")
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            model.zero_grad()

    return step


@dataclass
class Job:
    name: str
    library: str  # "ours" or "st"
    chunking: str  # "texts" or "tokens"
    step: Step


def _options(options: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items())


def make_jobs(
    folder: Path, examples: list[Pair], args, total_steps: int, run_dir: Path, phases: Phases
) -> list[Job]:
    settings = {
        "texts": ({"cache_chunk_size": args.chunk_size}, {"mini_batch_size": args.chunk_size}),
        # sentence-transformers' mini_batch_size also cuts the loss's rows into chunks.
        "tokens": (
            {"cache_chunk_tokens": args.chunk_tokens},
            {"mini_batch_size": args.chunk_size, "mini_batch_num_tokens": args.chunk_tokens},
        ),
    }
    jobs = []
    for chunking, (ours, st) in settings.items():
        jobs.append(
            Job(
                f"ours: Trainer, {_options(ours)}",
                "ours",
                chunking,
                our_step(folder, examples, ours, args, total_steps, run_dir, phases),
            )
        )
        jobs.append(
            Job(
                f"sentence-transformers: CMNRL, {_options(st)}",
                "st",
                chunking,
                st_step(folder, examples, st, args, total_steps, phases),
            )
        )
    return jobs


def measure(jobs: list[Job], args: argparse.Namespace, phases: Phases) -> dict[str, Result]:
    """Warm-up steps, the counted step, then the timed steps, the jobs taking turns; each
    round trains every job on the same batch, the next ``batch_size`` examples."""
    results = {job.name: Result() for job in jobs}
    rounds = args.warmup + 1 + args.steps
    for number in range(rounds):
        indices = list(range(number * args.batch_size, (number + 1) * args.batch_size))
        for job in jobs:
            result = results[job.name]
            timed = number > args.warmup
            around = contextlib.nullcontext
            if number == args.warmup:
                around = result.counting
            elif timed:
                around = functools.partial(torch.profiler.record_function, DEVICE_WORK)
            phases.seconds.clear()
            # The profiler starts and stops outside the timed span.
            profiler = profile(activities=[ProfilerActivity.CPU]) if timed else None
            with profiler or contextlib.nullcontext():
                start = time.perf_counter()
                job.step(indices, around)
                seconds = time.perf_counter() - start
            if timed:
                result.steps.append(seconds)
                result.phases.append({**phases.seconds, "aten ops": aten_seconds(profiler)})
        print(f"round {number + 1}/{rounds} done", flush=True)
    return results


# ------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------


def per_thousand(result: Result, batch_size: int) -> float:
    """Seconds per 1,000 examples, from the median step."""
    return statistics.median(result.steps) / batch_size * 1000


def breakdown(result: Result, batch_size: int) -> dict[str, float]:
    """Seconds per 1,000 examples in each part of the mean timed step: tokenization (less
    the packing inside it), packing, the optimizer's step, the aten ops of the rest, and
    Python with op dispatch, what remains."""
    parts = {
        name: statistics.fmean(p.get(name, 0.0) for p in result.phases) * 1000 / batch_size
        for name in ("tokenization", "packing", "optimizer", "aten ops")
    }
    parts["tokenization"] -= parts["packing"]
    step = statistics.fmean(result.steps) * 1000 / batch_size
    parts["Python & dispatch"] = step - sum(parts.values())
    return parts


def _ratio(job: Job, results: dict[str, Result], baseline: Job, batch_size: int) -> float:
    """The job's seconds per example over those of ``baseline``."""
    return per_thousand(results[job.name], batch_size) / per_thousand(
        results[baseline.name], batch_size
    )


def _row(job: Job, results: dict[str, Result], baseline: Job, batch_size: int) -> str:
    result = results[job.name]
    seconds = per_thousand(result, batch_size)
    ratio = _ratio(job, results, baseline, batch_size)
    parts = breakdown(result, batch_size)
    total = sum(parts.values())
    shares = [
        "–"
        if name == "packing" and job.library == "st"
        else f"{100 * value / total:.0f}% ({value:.3g})"
        for name, value in parts.items()
    ]
    counts = f"{result.syncs.count} | {result.ops:,}"
    return f"| {job.name} | {seconds:.3f} | {ratio:.2f}× | {counts} | {' | '.join(shares)} |"


def _verdict(
    jobs: list[Job], results: dict[str, Result], baseline: dict[str, Job], batch_size: int
) -> list[str]:
    """One line per chunking: ours' time per example over sentence-transformers'."""
    lines = []
    for job in jobs:
        if job.library == "ours":
            ratio = _ratio(job, results, baseline[job.chunking], batch_size)
            verdict = "met" if ratio <= TARGET else "not met"
            lines.append(
                f"ours / ST, chunks of {job.chunking}: {ratio:.2f}× (target ≤ {TARGET}×: {verdict})"
            )
    return lines


def report(
    jobs: list[Job],
    results: dict[str, Result],
    args: argparse.Namespace,
    argv: list[str],
    load_at_start: float,
    pairs: int,
) -> str:
    baseline = {job.chunking: job for job in jobs if job.library == "st"}
    lines = [
        "# Host overhead of a training step: ours vs sentence-transformers (CPU)",
        "",
        f"- device: {device_name('cpu')}, {torch.get_num_threads()} torch threads",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, transformers {package_version('transformers')},"
        f" sentence-transformers {package_version('sentence-transformers')}, tokenizers"
        f" {package_version('tokenizers')}",
        f"- 1-minute load average at start: {load_at_start:.1f}",
        f"- command: `python bench/host_overhead.py {shlex.join(argv)}`",
        "- model: random BERT, EncoderConfig.tiny (2 layers, 32 wide, 4 heads, FFN 64),"
        " MiniLM's tokenizer, mean pooling, normalised; fp32, fused AdamW lr"
        f" {LEARNING_RATE}, gradient clipping at {MAX_GRAD_NORM}",
        f"- data: SciFact train, {pairs} pairs with no text repeated, cycled; batch"
        f" {args.batch_size}, max_length {args.max_length}, chunk {args.chunk_size} texts or"
        f" {args.chunk_tokens} tokens",
        f"- {args.steps} timed step(s) per job after {args.warmup} warm-up step(s) and one"
        " counted step, the jobs taking turns",
        "",
        "| job | s / 1k examples | vs ST | syncs / step | aten ops / step | tokenization |"
        " packing | optimizer | in aten ops | Python & dispatch |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(job, results, baseline[job.chunking], args.batch_size) for job in jobs),
        "",
        "- s / 1k examples: the median step's seconds per 1,000 examples, tokenization"
        " included; vs ST: against sentence-transformers with the same chunking (the issue's"
        " target for ours: ≤ 0.5×)",
        "- syncs and aten ops / step: one step, after its tokenization (SyncCounter, and a"
        " TorchDispatchMode counting every op, backward included)",
        "- the last five columns: where the timed steps' time went, as a share of the mean"
        " step (seconds per 1k examples), timed with `time.perf_counter` unless said: tokenization"
        " is `prepare_batch` (ours: examples to a batch, tokens, packing; less the packing) or"
        " `model.preprocess` of both columns (ST); packing `Packing.from_mask`; optimizer the"
        " optimizer's `step`; in aten ops the self time of every aten op in the rest of the step"
        " (forward, backward, loss, clipping: kernels and their C++ dispatch; torch.profiler);"
        " Python & dispatch what remains (Python, its calls into torch, autograd's bookkeeping,"
        " the profiler's own cost per op)",
        "",
        "Synchronisations by op:",
        "",
        *(f"- {job.name}: {results[job.name].syncs.report()}" for job in jobs),
        "",
        *(_verdict(jobs, results, baseline, args.batch_size)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    # Loading a folder without sentence-transformers' module files logs a warning per
    # model, and the untrained BERT pooler is reported as newly initialised: expected here.
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load_at_start = os.getloadavg()[0]
    pairs = scifact_pairs()
    rounds = args.warmup + 1 + args.steps
    examples = cycled(pairs, rounds * args.batch_size)
    phases = Phases()
    with tempfile.TemporaryDirectory() as tmp, timed_packing(phases):
        folder = build_model_folder(Path(tmp), args.max_length)
        jobs = make_jobs(folder, examples, args, rounds, Path(tmp), phases)
        results = measure(jobs, args, phases)
    text = report(jobs, results, args, argv, load_at_start, len(pairs))
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
