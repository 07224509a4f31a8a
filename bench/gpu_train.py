"""Training and encoding throughput of our library against sentence-transformers.

Every job trains the same randomly initialised BERT (MiniLM's shape by default: 6 layers,
384 wide, 12 heads, BERT's vocabulary size) on the same random texts with torch's fused
AdamW (lr 2e-5), gradients clipped at norm 1.0, for ``--seconds`` each after
``--warmup-steps``, at each of ``--batch-sizes``:

* ours, GradCache by texts: ``Trainer.train_one_step`` step for step (``train_step`` with
  ``cache_chunk_size`` = ``--chunk-size`` texts per encoder pass on an ``InfoNCETask``
  (temperature 0.05, ``--loss-impl``) and a ``BiEncoder``, the gradient norm clipped, the
  loss and gradient norm read in one transfer, the update), the next batch drawn and
  tokenized on the prefetch thread as ``Trainer.fit`` does by default (``--no-prefetch``:
  on the main thread);
* ours, GradCache by tokens: the same with ``cache_chunk_tokens`` = ``--chunk-tokens``
  padded tokens per encoder pass, texts grouped by length;
* sentence-transformers: ``CachedMultipleNegativesRankingLoss`` (scale 20 = 1/0.05,
  ``mini_batch_size`` = ``--chunk-size``) on a ``SentenceTransformer`` of the same folder,
  called as its trainer calls it with its defaults (``loss(features, labels).backward()``,
  ``clip_grad_norm_`` at 1.0, fused AdamW, a scheduler step), tokenizing on the main
  thread as its trainer does with ``dataloader_num_workers=0``. Its trainer needs
  ``datasets``, which the GPU image lacks; the loop around the loss is ours, so the
  comparison is of the model, the loss, GradCache, tokenization and the update.

Each job's row gives examples/s and tokens/s (non-padding tokens embedded, queries and
documents). With ``--profile`` (every job, or the systems named) one more step runs under
``torch.profiler``: the busy share is the device time of the CUDA kernels (and copies) over
the wall time of that step (on CPU: the time inside aten ops over it), next to the top
ops. For our jobs one more step runs under ``runtime.syncs.SyncCounter``: the number of
device-to-host synchronisations of a step (1 for the Trainer: its one read). The summary
(``--summary``) states per batch size our examples/s over sentence-transformers' and the
busy share, against ``--target-ratio`` and ``--target-busy``.

``--budget`` bounds the whole run: a job is not started, and a job's timed loop, profile
or counted step is cut, when its steps would end past it; what was cut is marked so.

With bf16 (the default on CUDA) ours autocasts the encoder passes itself, and the
SentenceTransformer's forward is wrapped in ``torch.autocast`` the way accelerate wraps
it under the trainer's ``bf16=True``. Before training both encode ``--encode-texts``
documents (``BiEncoder.encode`` against ``SentenceTransformer.encode``, same batch size,
under the same autocast; 0 skips this), so the embeddings can be compared too.

The texts are words of a synthetic vocabulary (one WordPiece token each), so lengths are
exact: queries ``--query-words`` and documents ``--doc-words`` long (uniform ranges), and
the tokenizer is BERT's uncased WordPiece over that vocabulary, written by this script.

Examples (the GPU device check; a CPU rehearsal)::

    python bench/gpu_train.py --batch-sizes 4096 16384 --seconds 5 --profile ours \\
        ours_tokens --budget 118 --out report.md
    python bench/gpu_train.py --device cpu --batch-sizes 8 16 --chunk-size 4 \\
        --chunk-tokens 32 --layers 1 --hidden 32 --heads 4 --intermediate 64 \\
        --vocab-size 200 --seconds 1 --query-words 2 4 --doc-words 4 8 \\
        --encode-texts 16 --encode-batch 8 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import math
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import device_name, package_version

from biencoder.data.sampler import NoDuplicateBatchSampler
from biencoder.data.training import Pair
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import save_random_bert
from biencoder.runtime.syncs import SyncCounter
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.prefetch import Prefetcher
from biencoder.training.schedules import warmup_schedule
from biencoder.training.step import (
    ColumnEncoder,
    StepResult,
    TokenizedBatch,
    tokenize_batch,
    train_step,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEMPERATURE = 0.05
LEARNING_RATE = 2e-5
GRAD_CLIP = 1.0
# Jobs, in the order they run at each batch size: the comparison the targets are about
# (ours by texts against sentence-transformers) first, should the budget run out.
SYSTEMS = ("ours", "st", "ours_tokens")
OURS = ("ours", "ours_tokens")
JOB_NAMES = {
    "ours": "ours: Trainer step, GradCache by texts",
    "ours_tokens": "ours: Trainer step, GradCache by tokens",
    "st": "sentence-transformers: CachedMultipleNegativesRankingLoss",
}
SHORT_NAMES = {"ours": "ours", "ours_tokens": "ours by tokens", "st": "ST"}
ENCODER_NAMES = {"ours": "ours: BiEncoder.encode", "st": "sentence-transformers: encode"}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument(
        "--batch-sizes",
        "--batch-size",
        dest="batch_sizes",
        type=int,
        nargs="+",
        default=[4096, 16384],
        help="examples per step; every job runs at each",
    )
    parser.add_argument("--chunk-size", type=int, default=256, help="texts per encoder pass")
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=32768,
        help="padded tokens per encoder pass of the token-budget job",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per job")
    parser.add_argument("--max-steps", type=int, help="also stop each job after this many")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (see above)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text, at most")
    parser.add_argument("--query-words", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"))
    parser.add_argument("--doc-words", type=int, nargs=2, default=[48, 160], metavar=("MIN", "MAX"))
    parser.add_argument("--encode-texts", type=int, default=32768, help="0: no encoding")
    parser.add_argument("--encode-batch", type=int, default=512)
    parser.add_argument(
        "--loss-impl",
        choices=("auto", "triton", "torch", "naive"),
        default="auto",
        help="our InfoNCE implementation (auto: triton on CUDA)",
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        help="tokenize our next batch on the main thread (Trainer's trainer.prefetch=false)",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        choices=SYSTEMS,
        metavar="SYSTEM",
        help="after timing, profile one more step of these jobs (none named: every job)",
    )
    parser.add_argument(
        "--target-ratio", type=float, default=1.5, help="our examples/s over ST's, at least"
    )
    parser.add_argument(
        "--target-busy",
        type=float,
        default=80.0,
        help="%% of a profiled step the GPU is busy, at least",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--summary", type=Path, help="write a one-line summary here")
    args = parser.parse_args(argv)
    if args.profile == []:
        args.profile = list(SYSTEMS)
    args.profile = args.profile or []
    return args


# ------------------------------------------------------------------------------------------
# The model folder and the texts.
# ------------------------------------------------------------------------------------------


def _words(vocab_size: int) -> list[str]:
    return [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]


def build_model_folder(root: Path, args: argparse.Namespace) -> Path:
    """A random BERT of the requested shape with a WordPiece tokenizer of synthetic words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *_words(args.vocab_size)])}
    # Built with `tokenizers` rather than BertTokenizerFast, whose constructor changed
    # between transformers 4 and 5; this is BERT's uncased WordPiece pipeline.
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer_dir = root / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    config = EncoderConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.max_length),
        # The project's trainer turns attention dropout off (trainer.attention_dropout);
        # both jobs read this config, so both train alike.
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return save_random_bert(root / "model", tokenizer_dir, config)


def make_pairs(count: int, args: argparse.Namespace) -> list[Pair]:
    rng = random.Random(0)
    words = _words(args.vocab_size)

    def text(bounds: list[int]) -> str:
        return " ".join(rng.choices(words, k=rng.randint(*bounds)))

    return [Pair(text(args.query_words), text(args.doc_words)) for _ in range(count)]


def _batches(pairs: list[Pair], batch_size: int) -> Iterator[list[Pair]]:
    # Reshuffled every pass: the texts repeat across passes but never within a batch.
    rng = random.Random(1)
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [pairs[i] for i in order[start : start + batch_size]]


# ------------------------------------------------------------------------------------------
# The jobs: a step function each, timed by the same loop.
# ------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@dataclass
class Job:
    """A training job's steps: ``next_batch()`` is what the next step trains on (waiting for
    the prefetch thread, where there is one), ``run(batch)`` the step, returning the
    non-padding tokens it embedded; ``close()`` stops the helper thread."""

    next_batch: Callable[[], Any]
    run: Callable[[Any], int]
    close: Callable[[], None] = lambda: None
    params: list[torch.Tensor] = field(default_factory=list)  # what a step updates (ours)

    def step(self) -> int:
        return self.run(self.next_batch())


def read_step(result: StepResult, grad_norm: torch.Tensor) -> list[float]:
    """The loss, the gradient norm and the task's statistics (sorted by name), read to the
    host in one transfer: what ``Trainer.read_step`` reads on one process."""
    values = [result.loss, grad_norm, *(result.stats[k] for k in sorted(result.stats))]
    return torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]).tolist()


def our_job(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    args,
    batch_size: int,
    pairs: list[Pair],
    *,
    by_tokens: bool,
) -> Job:
    """``Trainer.train_one_step`` on one process, step for step: ``train_step`` (GradCache
    by texts or, ``by_tokens``, by tokens), ``clip_grad_norm_`` at 1.0, the loss and the
    norm read in one transfer, the update when both are finite, the scheduler, the gradients
    zeroed. As ``Trainer.fit`` runs it, the next batch is drawn from a duplicate-free
    sampler (seed 0, the Trainer's) and tokenized on the prefetch thread during the current
    step (``--no-prefetch``: on the main thread, when the step asks for it).

    Not the Trainer itself: ``training.trainer`` imports ``data.training_sets``, which
    reaches faiss through hard-negative mining, and the GPU image has no faiss.
    tests/test_device_check.py checks that a step here changes the weights exactly as a
    ``Trainer`` step does."""
    model = BiEncoder.from_pretrained(folder, max_length=args.max_length, device=device).train()
    task = InfoNCETask(temperature=TEMPERATURE, impl=args.loss_impl).to(device)
    params = [p for p in (*model.parameters(), *task.parameters()) if p.requires_grad]
    # What conf/optim's fused: null gives on CUDA, here on the CPU too: the plain kernel
    # reads a step counter per parameter on the host, which the CPU rehearsal would count
    # as synchronisations that a GPU run does not have.
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True)
    scheduler = warmup_schedule(optimizer, 10**9, warmup_ratio=0.0, decay="constant")
    chunk_size = None if by_tokens else args.chunk_size
    chunk_tokens = args.chunk_tokens if by_tokens else None
    sampler = NoDuplicateBatchSampler(
        [(pair.query, pair.positive) for pair in pairs], batch_size, seed=0
    )

    def endless() -> Iterator[list[int]]:
        while True:
            yield from sampler

    batches = endless()

    def prepare() -> TokenizedBatch:
        examples = task.make_batch([pairs[i] for i in next(batches)])
        return tokenize_batch(model, examples, chunk_size, args.max_length, chunk_tokens)

    prepared = Prefetcher(prepare, enabled=args.prefetch)
    encoder = ColumnEncoder(model)

    def run(batch: TokenizedBatch) -> int:
        result = train_step(
            model,
            task,
            batch,
            autocast=dtype,
            cache_chunk_size=chunk_size,
            cache_chunk_tokens=chunk_tokens,
            max_length=args.max_length,
            encoder=encoder,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        loss, norm, *_stats = read_step(result, grad_norm)
        if math.isfinite(loss) and math.isfinite(norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return result.tokens

    return Job(lambda: next(prepared), run, prepared.close, params)


def _sentence_transformer(folder: Path, device: torch.device, dtype, args):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=str(device))
    model.max_seq_length = args.max_length
    if dtype is not None:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return model


def st_job(
    folder: Path, device: torch.device, dtype, args, batch_size: int, pairs: list[Pair]
) -> Job:
    """Steps of sentence-transformers with its trainer's defaults (clipping at 1.0, fused
    AdamW, a scheduler step), tokenizing as its trainer does with
    ``dataloader_num_workers=0``: on the main thread, inside the step."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    model = _sentence_transformer(folder, device, dtype, args).train()
    loss_fn = CachedMultipleNegativesRankingLoss(
        model, scale=1 / TEMPERATURE, mini_batch_size=args.chunk_size
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = _batches(pairs, batch_size)

    def features(texts: list[str]) -> tuple[dict, int]:
        tokens = model.preprocess(texts)
        # Counted on the host, before the copy: a count read back from the GPU would add a
        # synchronisation to every step that its trainer does not have.
        count = int(tokens["attention_mask"].sum())
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in tokens.items()
        }
        return moved, count

    def run(examples: list[Pair]) -> int:
        queries, query_tokens = features([e.query for e in examples])
        docs, doc_tokens = features([e.positive for e in examples])
        loss_fn([queries, docs], None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return query_tokens + doc_tokens

    return Job(lambda: next(batches), run)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """The run's deadline (``--budget``), for deciding whether a step still fits."""

    def __init__(self, budget: float | None) -> None:
        self.deadline = time.perf_counter() + budget if budget else math.inf

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()


SPENT = "skipped: time budget spent"


def time_training(
    job: Job, system: str, batch_size: int, device: torch.device, args, clock: Clock
) -> dict:
    try:
        return _time_steps(job, system, batch_size, device, args, clock)
    finally:
        job.close()


def _time_steps(
    job: Job, system: str, batch_size: int, device: torch.device, args, clock: Clock
) -> dict:
    for _ in range(args.warmup_steps):
        job.step()
    _synchronize(device)
    if clock.left() <= 0:
        return {"status": f"{SPENT} in the warm-up"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = tokens = 0
    start = time.perf_counter()
    while True:
        tokens += job.step()
        steps += 1
        # No synchronisation per step: the host runs ahead as in a real loop (ours reads
        # its loss every step; sentence-transformers' trainer does not), and the one at
        # the end counts whatever is still queued.
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds or (args.max_steps and steps >= args.max_steps):
            break
        if not clock.fits(elapsed / steps):
            break
    _synchronize(device)
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {"status": "ok", "steps": steps, "seconds": elapsed}
    result |= {"tokens": tokens, "examples": steps * batch_size}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    per_step = elapsed / steps
    # The profiled and counted steps come after the timing, and a failure in either is a
    # note in its cell, not the loss of the job's timing.
    if system in args.profile:
        # The profiler slows the host: a step under it takes longer than a timed one.
        if not clock.fits(2 * per_step):
            result["busy_note"] = SPENT
        else:
            try:
                result |= profile_step(job, device)
            except Exception as error:
                traceback.print_exc()
                result["busy_note"] = _failure(error)
    if system in OURS:
        if not clock.fits(2 * per_step):
            result["syncs_note"] = SPENT
        else:
            try:
                syncs = count_syncs(job)
            except Exception as error:
                traceback.print_exc()
                result["syncs_note"] = _failure(error)
            else:
                result |= {"syncs": syncs.count, "syncs_report": syncs.report()}
    return result


def count_syncs(job: Job) -> SyncCounter:
    """The device-to-host synchronisations of one step, the batch prepared beforehand
    as the prefetch thread prepares it (tests/sync_steps.py counts the same way)."""
    batch = job.next_batch()
    with SyncCounter() as syncs:
        job.run(batch)
    return syncs


def _cpu_busy_us(prof) -> float:
    """On the CPU: the time inside aten ops (the union of their intervals, any thread)."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.name.startswith("aten::")
    )
    busy, reached = 0.0, -math.inf
    for start, end in intervals:
        if end > reached:
            busy += end - max(start, reached)
            reached = end
    return busy


def profile_step(job: Job, device: torch.device) -> dict:
    """One step under torch.profiler: the busy share (CUDA: the device time of every
    kernel and copy over the step's wall time; CPU: time inside aten ops over it) and the
    top ops by their own device time (CPU time without CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        job.step()
        _synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if on_gpu:
        # The kernels themselves (device events), not the ops that launched them as well.
        busy_us = sum(
            event.self_device_time_total
            for event in events
            if event.device_type == torch.autograd.DeviceType.CUDA
        )
    else:
        busy_us = _cpu_busy_us(prof)
    busy = busy_us / 1e6
    what = "GPU busy" if on_gpu else "CPU in aten ops"
    header = f"one step: {wall:.2f} s wall (under the profiler), {what} {busy:.2f} s"
    header += f" ({100 * busy / wall:.0f}%)"
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60)
    return {
        "busy": busy / wall,
        "busy_seconds": busy,
        "profile_wall": wall,
        "profile": header + "\n" + table,
    }


def time_encoding(encode, texts: list[str], device: torch.device, dtype) -> dict:
    with _autocast(device, dtype):
        encode(texts[: min(len(texts), 256)])
        _synchronize(device)
        start = time.perf_counter()
        embeddings = encode(texts)
        _synchronize(device)
    return {"seconds": time.perf_counter() - start, "embeddings": torch.as_tensor(embeddings)}


# ------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------


def _failure(error: BaseException) -> str:
    first_line = (str(error).splitlines() or [""])[0][:160]
    return f"failed: {type(error).__name__}: {first_line}"


def _examples_per_s(result: dict | str | None) -> float | None:
    if isinstance(result, dict) and result.get("status") == "ok":
        return result["examples"] / result["seconds"]
    return None


def _status(result: dict | str | None) -> str:
    if result is None:
        return "not run"
    return result if isinstance(result, str) else result["status"]


def _busy_cell(result: dict) -> str:
    if "busy" not in result:
        return result.get("busy_note", "–")
    per_step = result["seconds"] / result["steps"]
    return (
        f"{100 * result['busy']:.0f}%: {result['busy_seconds']:.2f} of"
        f" {result['profile_wall']:.2f} s (timed step {per_step:.2f} s)"
    )


def _train_row(system: str, batch_size: int, result: dict | str, st: dict | str | None) -> str:
    name = JOB_NAMES[system]
    rate = _examples_per_s(result)
    if rate is None:
        status = _status(result).replace("|", "/")
        return f"| {name} | {batch_size} | {status} | – | – | – | – | – | – | – |"
    st_rate = _examples_per_s(st)
    ratio = f"{rate / st_rate:.2f}×" if st_rate else "–"
    peak = f"{result['peak_gib']:.1f}" if "peak_gib" in result else "–"
    syncs = str(result["syncs"]) if "syncs" in result else result.get("syncs_note", "–")
    busy = _busy_cell(result).replace("|", "/")
    syncs = syncs.replace("|", "/")
    return (
        f"| {name} | {batch_size} | {result['steps']} | {rate:,.0f} |"
        f" {result['tokens'] / result['seconds']:,.0f} |"
        f" {result['seconds'] / result['steps']:.3f} | {peak} | {busy} |"
        f" {syncs} | {ratio} |"
    )


def _encode_row(name: str, result: dict | str, tokens: int, baseline: dict | str | None) -> str:
    if isinstance(result, str):
        return f"| {name} | {result} | – | – | – |"
    ratio = "–"
    if isinstance(baseline, dict):
        ratio = f"{baseline['seconds'] / result['seconds']:.2f}×"
    count = result["embeddings"].shape[0]
    return (
        f"| {name} | {count / result['seconds']:,.0f} | {tokens / result['seconds']:,.0f} |"
        f" {result['seconds']:.2f} | {ratio} |"
    )


def _encoder(system: str, folder: Path, device: torch.device, args) -> Callable:
    if system == "ours":
        model = BiEncoder.from_pretrained(folder, max_length=args.max_length, device=device)
        return lambda texts: model.encode(
            texts, kind="doc", batch_size=args.encode_batch, show_progress=False
        )
    model = _sentence_transformer(folder, device, None, args)
    return lambda texts: model.encode(
        texts, batch_size=args.encode_batch, normalize_embeddings=True, show_progress_bar=False
    )


def _measure(work: Callable[[], Any], device: torch.device) -> Any:
    """``work()``, or the one-line reason it failed (its traceback goes to stderr)."""
    try:
        return work()
    except Exception as error:
        traceback.print_exc()
        return _failure(error)
    finally:
        # Each job's model and optimiser state are gone by now; the next job starts from
        # an empty device.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _make_job(system, folder, device, dtype, args, batch_size, pairs) -> Job:
    if system == "st":
        return st_job(folder, device, dtype, args, batch_size, pairs)
    return our_job(
        folder, device, dtype, args, batch_size, pairs, by_tokens=system == "ours_tokens"
    )


def _print_progress(system: str, batch_size: int, result: dict | str) -> None:
    line = f"train {system} batch {batch_size}: {_rate(result, 'train')}"
    if isinstance(result, dict):
        if "busy" in result:
            line += f", busy {100 * result['busy']:.0f}%"
        if "syncs" in result:
            line += f", {_syncs(result['syncs'])}"
    print(line, flush=True)
    if isinstance(result, dict) and "profile" in result:
        print(result["profile"], flush=True)
    if isinstance(result, dict) and "syncs_report" in result:
        print(f"syncs of one step: {result['syncs_report']}", flush=True)


def _expected_seconds(system: str, batch_size: int, training: dict, args) -> float:
    """The least a job costs, guessed from its run at a smaller batch scaled by the batch:
    its warm-up and one timed step (the profiled and counted steps are cut first)."""
    done = [
        (batch, result)
        for (name, batch), result in training.items()
        if name == system and _examples_per_s(result)
    ]
    if not done:
        return 0.0
    batch, result = max(done, key=lambda item: item[0])
    per_step = result["seconds"] / result["steps"] * batch_size / batch
    return per_step * (args.warmup_steps + 1)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    clock = Clock(args.budget)
    # Loading a folder without sentence-transformers' module files logs a warning per
    # model, and the untrained BERT pooler is reported as newly initialised: expected here.
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load_at_start = os.getloadavg()[0]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None

    pairs = make_pairs(max(2 * max(args.batch_sizes), args.encode_texts), args)
    doc_texts = [pair.positive for pair in pairs[: args.encode_texts]]
    systems = [system for system in SYSTEMS if system in args.systems]
    training: dict[tuple[str, int], dict | str] = {}
    encoding: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp), args)
        for system in ("ours", "st") if doc_texts else ():
            if system not in systems and not (system == "ours" and "ours_tokens" in systems):
                continue
            encoding[system] = _measure(
                lambda system=system: time_encoding(
                    _encoder(system, folder, device, args), doc_texts, device, dtype
                ),
                device,
            )
            print(f"encode {system}: {_rate(encoding[system], 'encode')}", flush=True)
        for batch_size in args.batch_sizes:
            for system in systems:
                expected = _expected_seconds(system, batch_size, training, args)
                if clock.left() <= 0 or not clock.fits(expected):
                    result = SPENT
                else:

                    def work(system=system, batch_size=batch_size) -> dict:
                        job = _make_job(system, folder, device, dtype, args, batch_size, pairs)
                        return time_training(job, system, batch_size, device, args, clock)

                    result = _measure(work, device)
                training[(system, batch_size)] = result
                _print_progress(system, batch_size, result)

    doc_tokens = sum(len(text.split()) + 2 for text in doc_texts)
    report = _report(args, device, precision, load_at_start, training, encoding, doc_tokens)
    print(report, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    if args.summary:
        args.summary.write_text(_summary(args, device, training, encoding) + "\n")


def _report(args, device, precision, load_at_start, training, encoding, doc_tokens):
    systems = [system for system in SYSTEMS if system in args.systems]
    # Table order: our two jobs, then sentence-transformers, per batch size.
    table_order = [s for s in ("ours", "ours_tokens", "st") if s in systems]
    busy = "GPU busy" if device.type == "cuda" else "busy (CPU: in aten ops)"
    lines = [
        "# Training and encoding throughput: ours vs sentence-transformers",
        "",
        f"- device: {device_name(device.type)}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, triton {package_version('triton')}, transformers"
        f" {package_version('transformers')}, sentence-transformers"
        f" {package_version('sentence-transformers')}",
        f"- 1-minute load average at start: {load_at_start:.1f}",
        f"- command: `python bench/gpu_train.py {' '.join(sys.argv[1:])}`",
        f"- model: random BERT, {args.layers} layers, {args.hidden} wide, {args.heads} heads,"
        f" FFN {args.intermediate}, vocabulary {args.vocab_size}; mean pooling, normalised",
        f"- texts: queries {args.query_words[0]}–{args.query_words[1]} words, documents"
        f" {args.doc_words[0]}–{args.doc_words[1]} words (one token each), max_length"
        f" {args.max_length}",
        f"- training: batches {', '.join(map(str, args.batch_sizes))}; GradCache chunks of"
        f" {args.chunk_size} texts (by tokens: {args.chunk_tokens} padded tokens); {precision};"
        f" fused AdamW lr {LEARNING_RATE},"
        f" gradients clipped at {GRAD_CLIP}; temperature {TEMPERATURE}; our loss"
        f" impl={args.loss_impl}; our tokenization {'prefetched' if args.prefetch else 'inline'};"
        f" {args.seconds:g} s per job after {args.warmup_steps} untimed step(s); ours is"
        " Trainer.train_one_step mirrored step for step (training.trainer imports faiss)"
        + (f"; --budget {args.budget:g} s" if args.budget else ""),
        "- tokens: non-padding tokens embedded (queries and documents); "
        f"{busy}: device time of one profiled step's kernels over its wall time (the"
        " profiler slows the host, so the timed step's length is given beside it); syncs:"
        " device-to-host synchronisations of one step (runtime.syncs.SyncCounter)",
        "",
        f"| training job | batch | steps | examples/s | tokens/s | s/step | peak GiB | {busy}"
        " | syncs/step | vs ST |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in args.batch_sizes:
        lines += [
            _train_row(
                system, batch_size, training[(system, batch_size)], training.get(("st", batch_size))
            )
            for system in table_order
        ]
    if encoding:
        st_encode = encoding.get("st")
        lines += [
            "",
            f"Encoding {args.encode_texts} documents, batch {args.encode_batch}, {precision},"
            " before training, after a warm-up batch:",
            "",
            "| encoder | texts/s | tokens/s | seconds | vs ST |",
            "|---|---|---|---|---|",
        ]
        lines += [
            _encode_row(ENCODER_NAMES[system], result, doc_tokens, st_encode)
            for system, result in encoding.items()
        ]
        if all(isinstance(encoding.get(s), dict) for s in ("ours", "st")):
            ours_emb = encoding["ours"]["embeddings"].float()
            st_emb = encoding["st"]["embeddings"].float()
            difference = (ours_emb - st_emb).abs().max().item()
            lines += [
                "",
                f"- max |ours − sentence-transformers| over the embeddings: {difference:.2e}",
            ]
    for batch_size in args.batch_sizes:
        for system in table_order:
            result = training[(system, batch_size)]
            if isinstance(result, dict) and "profile" in result:
                lines += ["", f"Profile of one step, {JOB_NAMES[system]}, batch {batch_size}:"]
                lines += ["", "```text", result["profile"], "```"]
            if isinstance(result, dict) and "syncs_report" in result:
                lines += ["", f"Synchronisations of one step: {result['syncs_report']}"]
    return "\n".join(lines) + "\n"


def _rate(result: dict | str | None, kind: str) -> str:
    if kind == "train":
        rate = _examples_per_s(result)
        return f"{rate:,.0f} examples/s" if rate is not None else _status(result)
    if not isinstance(result, dict):
        return result or "not run"
    return f"{result['embeddings'].shape[0] / result['seconds']:,.0f} texts/s"


def _syncs(count: int) -> str:
    return f"{count} sync{'' if count == 1 else 's'}/step"


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def _summary(args, device: torch.device, training: dict, encoding: dict) -> str:
    """Per batch size: sentence-transformers' examples/s, then each of our jobs' examples/s,
    its ratio to ST's and its busy share, each against its target, and its syncs."""
    busy_name = "GPU busy" if device.type == "cuda" else "CPU busy"
    parts = []
    for batch_size in args.batch_sizes:
        st = training.get(("st", batch_size))
        st_rate = _examples_per_s(st)
        clauses = [f"ST {st_rate:,.0f} ex/s" if st_rate else f"ST {_status(st)}"]
        for system in OURS:
            if system not in args.systems:
                continue
            result = training[(system, batch_size)]
            rate = _examples_per_s(result)
            if rate is None:
                clauses.append(f"{SHORT_NAMES[system]} {_status(result)}")
                continue
            clause = f"{SHORT_NAMES[system]} {rate:,.0f} ex/s"
            if st_rate:
                ratio = rate / st_rate
                clause += (
                    f" = {ratio:.2f}× ST (≥ {args.target_ratio:g}×:"
                    f" {_verdict(ratio, args.target_ratio)})"
                )
            else:
                clause += " = ratio missing"
            if "busy" in result:
                percent = 100 * result["busy"]
                clause += (
                    f", {busy_name} {percent:.0f}% (≥ {args.target_busy:g}%:"
                    f" {_verdict(percent, args.target_busy)})"
                )
            else:
                clause += f", {busy_name} missing"
            clause += f", {_syncs(result['syncs'])}" if "syncs" in result else ", syncs missing"
            clauses.append(clause)
        parts.append(f"B={batch_size}: " + "; ".join(clauses))
    if encoding:
        parts.append(
            f"encode ours {_rate(encoding.get('ours'), 'encode')} vs ST"
            f" {_rate(encoding.get('st'), 'encode')}"
        )
    # No "|": the line goes into a Markdown table.
    return ". ".join(parts)


if __name__ == "__main__":
    main()
