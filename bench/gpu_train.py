"""Training and encoding throughput of our library against sentence-transformers.

Both jobs train the same randomly initialised BERT (MiniLM's shape by default: 6 layers,
384 wide, 12 heads, BERT's vocabulary size) on the same random texts with the same
optimiser (AdamW, lr 2e-5) for ``--seconds`` each after ``--warmup-steps``:

* ours: ``training.train_step`` with GradCache (``--chunk-size`` texts per encoder pass)
  on an ``InfoNCETask`` (temperature 0.05, ``--loss-impl``) and a ``BiEncoder``,
  the next batch tokenized on a background thread as ``Trainer`` does by default
  (``--no-prefetch``: on the main thread);
* sentence-transformers: ``CachedMultipleNegativesRankingLoss`` (scale 20 = 1/0.05,
  ``mini_batch_size`` = ``--chunk-size``) on a ``SentenceTransformer`` of the same folder,
  called as its trainer calls it (``loss(features, labels).backward()``), tokenizing on
  the main thread as its trainer does with its default ``dataloader_num_workers=0``. Its
  trainer needs ``datasets``, which the GPU image lacks; the loop around the loss is ours
  for both jobs, so the comparison is of the model, the loss, GradCache and tokenization.

With bf16 (the default on CUDA) ours autocasts the encoder passes itself, and the
SentenceTransformer's forward is wrapped in ``torch.autocast`` the way accelerate wraps
it under the trainer's ``bf16=True``. Then both encode ``--encode-texts`` documents
(``BiEncoder.encode`` against ``SentenceTransformer.encode``, same batch size, under the
same autocast) before any training, so the embeddings can be compared too.

The texts are words of a synthetic vocabulary (one WordPiece token each), so lengths are
exact: queries ``--query-words`` and documents ``--doc-words`` long (uniform ranges), and
the tokenizer is BERT's uncased WordPiece over that vocabulary, written by this script.

Examples (the GPU device check; a CPU rehearsal)::

    python bench/gpu_train.py --seconds 40 --out report.md
    python bench/gpu_train.py --device cpu --batch-size 16 --chunk-size 8 --layers 2 \\
        --hidden 32 --heads 4 --intermediate 64 --vocab-size 1000 --seconds 2 \\
        --query-words 4 8 --doc-words 8 16 --encode-texts 64 --encode-batch 16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import device_name, package_version

from biencoder.data.training import Pair
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import save_random_bert
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.prefetch import Prefetcher
from biencoder.training.step import TokenizedBatch, tokenize_batch, train_step

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEMPERATURE = 0.05
LEARNING_RATE = 2e-5


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--batch-size", type=int, default=4096, help="examples per step")
    parser.add_argument("--chunk-size", type=int, default=256, help="texts per encoder pass")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per job")
    parser.add_argument("--max-steps", type=int, help="also stop each job after this many")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text, at most")
    parser.add_argument("--query-words", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"))
    parser.add_argument("--doc-words", type=int, nargs=2, default=[48, 160], metavar=("MIN", "MAX"))
    parser.add_argument("--encode-texts", type=int, default=32768)
    parser.add_argument("--encode-batch", type=int, default=512)
    parser.add_argument(
        "--loss-impl",
        choices=("auto", "triton", "torch", "naive"),
        default="auto",
        help="our InfoNCE implementation (auto: triton on CUDA)",
    )
    parser.add_argument("--systems", nargs="+", choices=("ours", "st"), default=["ours", "st"])
    parser.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        help="tokenize our next batch on the main thread (Trainer's trainer.prefetch=false)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more step of each job (torch.profiler, top ops)",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--summary", type=Path, help="write a one-line summary here")
    return parser.parse_args(argv)


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
# The two jobs: a step function each, timed by the same loop.
# ------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def our_step(
    folder: Path, device: torch.device, dtype, args, batches: Iterator[list[Pair]]
) -> Callable[[], int]:
    """One training step of ours per call, as ``Trainer`` runs it: the next batch is drawn
    and tokenized on a background thread during the current step (``--no-prefetch``: on
    the main thread, when the step asks for it)."""
    model = BiEncoder.from_pretrained(folder, max_length=args.max_length, device=device).train()
    task = InfoNCETask(temperature=TEMPERATURE, impl=args.loss_impl).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *task.parameters()], lr=LEARNING_RATE)

    def prepare() -> TokenizedBatch:
        return tokenize_batch(model, task.make_batch(next(batches)), args.chunk_size, None)

    prepared = Prefetcher(prepare, enabled=args.prefetch)

    def step() -> int:
        result = train_step(
            model, task, next(prepared), cache_chunk_size=args.chunk_size, autocast=dtype
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.tokens

    step.close = prepared.close
    return step


def _sentence_transformer(folder: Path, device: torch.device, dtype, args):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=str(device))
    model.max_seq_length = args.max_length
    if dtype is not None:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return model


def st_step(
    folder: Path, device: torch.device, dtype, args, batches: Iterator[list[Pair]]
) -> Callable[[], int]:
    """One step of sentence-transformers per call, tokenizing as its trainer does with its
    default ``dataloader_num_workers=0``: on the main thread."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    model = _sentence_transformer(folder, device, dtype, args).train()
    loss_fn = CachedMultipleNegativesRankingLoss(
        model, scale=1 / TEMPERATURE, mini_batch_size=args.chunk_size
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    def features(texts: list[str]) -> dict:
        return {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in model.preprocess(texts).items()
        }

    def step() -> int:
        examples = next(batches)
        columns = [
            features([e.query for e in examples]),
            features([e.positive for e in examples]),
        ]
        loss_fn(columns, None).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(int(column["attention_mask"].sum()) for column in columns)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(step: Callable[[], int], device: torch.device, args) -> dict:
    try:
        return _time_steps(step, device, args)
    finally:
        getattr(step, "close", lambda: None)()


def _time_steps(step: Callable[[], int], device: torch.device, args) -> dict:
    for _ in range(args.warmup_steps):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = tokens = 0
    start = time.perf_counter()
    while True:
        tokens += step()
        steps += 1
        # Synchronised every step, so that the time bound is checked against work done.
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds or (args.max_steps and steps >= args.max_steps):
            break
    result = {"steps": steps, "seconds": elapsed, "tokens": tokens}
    result["examples"] = steps * args.batch_size
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        result["profile"] = profile_step(step, device)
    return result


def profile_step(step: Callable[[], int], device: torch.device) -> str:
    """The ops of one step by their own device time (CPU time without CUDA): where a
    step's time goes, and how much of the wall time the GPU sat idle."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        _synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    busy = ""
    if on_gpu:
        # The kernels themselves (device events), not the ops that launched them as well.
        device_us = sum(
            event.self_device_time_total
            for event in events
            if event.device_type == torch.autograd.DeviceType.CUDA
        )
        busy = f", GPU busy {device_us / 1e6:.2f} s ({100 * device_us / 1e6 / wall:.0f}%)"
    header = f"one step: {wall:.2f} s wall (under the profiler){busy}"
    return header + "\n" + events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60)


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


def _train_row(name: str, result: dict | str, baseline: dict | str | None) -> str:
    if isinstance(result, str):
        return f"| {name} | {result} | – | – | – | – | – |"
    examples_per_s = result["examples"] / result["seconds"]
    ratio = "–"
    if isinstance(baseline, dict):
        ratio = f"{examples_per_s / (baseline['examples'] / baseline['seconds']):.2f}×"
    peak = f"{result['peak_gib']:.1f}" if "peak_gib" in result else "–"
    return (
        f"| {name} | {result['steps']} | {examples_per_s:,.0f} |"
        f" {result['tokens'] / result['seconds']:,.0f} |"
        f" {result['seconds'] / result['steps']:.3f} | {peak} | {ratio} |"
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


STEPS = {"ours": our_step, "st": st_step}
JOB_NAMES = {
    "ours": "ours: train_step + InfoNCETask, GradCache",
    "st": "sentence-transformers: CachedMultipleNegativesRankingLoss",
}
ENCODER_NAMES = {"ours": "ours: BiEncoder.encode", "st": "sentence-transformers: encode"}


def _measure(work: Callable[[], dict], device: torch.device) -> dict | str:
    """``work()``, or the one-line reason it failed (its traceback goes to stderr)."""
    try:
        return work()
    except Exception as error:
        traceback.print_exc()
        return _failure(error)
    finally:
        # Each job's model and optimiser state are gone by now; the next job starts from
        # an empty device.
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
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

    pairs = make_pairs(max(2 * args.batch_size, args.encode_texts), args)
    doc_texts = [pair.positive for pair in pairs[: args.encode_texts]]
    training: dict[str, dict | str] = {}
    encoding: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp), args)
        for system in args.systems:
            encoding[system] = _measure(
                lambda system=system: time_encoding(
                    _encoder(system, folder, device, args), doc_texts, device, dtype
                ),
                device,
            )
            print(f"encode {system}: {_rate(encoding[system], 'encode')}", flush=True)
        for system in args.systems:
            training[system] = _measure(
                lambda system=system: time_training(
                    STEPS[system](folder, device, dtype, args, _batches(pairs, args.batch_size)),
                    device,
                    args,
                ),
                device,
            )
            print(f"train {system}: {_rate(training[system], 'train')}", flush=True)
            if isinstance(training[system], dict) and "profile" in training[system]:
                print(training[system]["profile"], flush=True)

    doc_tokens = sum(len(text.split()) + 2 for text in doc_texts)
    report = _report(args, device, precision, load_at_start, training, encoding, doc_tokens)
    print(report, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    if args.summary:
        args.summary.write_text(_summary(training, encoding) + "\n")


def _report(args, device, precision, load_at_start, training, encoding, doc_tokens):
    st = training.get("st")
    st_encode = encoding.get("st")
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
        f"- training: batch {args.batch_size}, GradCache chunk {args.chunk_size}, {precision},"
        f" AdamW lr {LEARNING_RATE}, temperature {TEMPERATURE}, our loss impl={args.loss_impl},"
        f" our tokenization {'prefetched' if args.prefetch else 'inline'};"
        f" {args.seconds:.0f} s per job after {args.warmup_steps} untimed step(s); tokens"
        " are non-padding tokens embedded (queries and documents)",
        "",
        "| training job | steps | examples/s | tokens/s | s/step | peak GiB | vs ST |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        _train_row(JOB_NAMES[system], training[system], st)
        for system in args.systems
        if system in training
    ]
    lines += [
        "",
        f"Encoding {args.encode_texts} documents, batch {args.encode_batch}, {precision},"
        " before training, after a warm-up batch:",
        "",
        "| encoder | texts/s | tokens/s | seconds | vs ST |",
        "|---|---|---|---|---|",
    ]
    lines += [
        _encode_row(ENCODER_NAMES[system], encoding[system], doc_tokens, st_encode)
        for system in args.systems
        if system in encoding
    ]
    if all(isinstance(encoding.get(s), dict) for s in ("ours", "st")):
        ours_emb = encoding["ours"]["embeddings"].float()
        st_emb = encoding["st"]["embeddings"].float()
        difference = (ours_emb - st_emb).abs().max().item()
        lines += ["", f"- max |ours − sentence-transformers| over the embeddings: {difference:.2e}"]
    for system in args.systems:
        result = training.get(system)
        if isinstance(result, dict) and "profile" in result:
            lines += ["", f"Profile of one step, {JOB_NAMES[system]}:", "", "```text"]
            lines += [result["profile"], "```"]
    return "\n".join(lines) + "\n"


def _rate(result: dict | str | None, kind: str) -> str:
    if not isinstance(result, dict):
        return result or "not run"
    count = result["examples"] if kind == "train" else result["embeddings"].shape[0]
    unit = "examples/s" if kind == "train" else "texts/s"
    return f"{count / result['seconds']:,.0f} {unit}"


def _summary(training: dict, encoding: dict) -> str:
    return (
        f"train ours {_rate(training.get('ours'), 'train')} vs ST"
        f" {_rate(training.get('st'), 'train')}; encode ours"
        f" {_rate(encoding.get('ours'), 'encode')} vs ST {_rate(encoding.get('st'), 'encode')}"
    )


if __name__ == "__main__":
    main()
