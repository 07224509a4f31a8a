"""One optimisation step's forward and backward, plainly or with gradient caching.

GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup") makes a contrastive loss over a large batch fit in the memory of a small
one. The loss depends on the model only through the embeddings, so

1. every column is embedded chunk by chunk without building a graph;
2. the loss is computed on those embeddings (as leaves) and backpropagated, which gives
   d loss / d embedding for every text (and the loss's own parameter gradients);
3. each chunk is embedded again, now with a graph, and backpropagated with its cached
   embedding gradient; its activations are freed before the next chunk.

The parameter gradients equal those of the plain step, while activation memory is that
of one chunk. The re-embedding must reproduce the first pass exactly, so the random
state (dropout) before each chunk is recorded and replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from biencoder.model.biencoder import BiEncoder, Kind
from biencoder.training.tasks import Task, TextBatch


class RandomState:
    """A snapshot of torch's CPU generator and, for a CUDA device, of the CUDA generators.

    ``with state.replay():`` runs its body from the snapshot's state, then puts back the
    state from before the block, so that replaying leaves the random stream untouched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        outer = RandomState(self.device)
        self.restore()
        try:
            yield
        finally:
            outer.restore()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _chunks(texts: list[str], chunk_size: int | None) -> Iterator[list[str]]:
    step = chunk_size or max(len(texts), 1)
    for start in range(0, len(texts), step):
        yield texts[start : start + step]


@dataclass
class StepResult:
    """What one training step reports: the loss, the task's statistics, and what the
    encoder saw: ``tokens`` (non-padding tokens embedded, summed over every column) and
    ``seq_len_max`` (the longest text after truncation)."""

    loss: float
    stats: dict[str, float]
    tokens: int
    seq_len_max: int


class TokenCount:
    """Running totals of what the encoder was given, read off the attention masks."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seq_len_max = 0

    def add(self, features: dict[str, torch.Tensor]) -> None:
        lengths = features["attention_mask"].sum(dim=1)
        self.tokens += int(lengths.sum())
        self.seq_len_max = max(self.seq_len_max, int(lengths.max()))


def _tokenize(
    model: BiEncoder, texts: list[str], kind: Kind, max_length: int | None
) -> dict[str, torch.Tensor]:
    """Token tensors on the CPU, in pinned memory when they are bound for a GPU: a pinned
    copy can run asynchronously (``non_blocking``) while the host goes on."""
    features = model.tokenize(texts, kind, max_length)
    if model.device.type == "cuda":
        features = {name: t.pin_memory() for name, t in features.items()}
    return features


def _to_device(features: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in features.items()}


@dataclass
class TokenizedBatch:
    """A batch with its texts already tokenized, column by column and chunk by chunk, on the
    CPU: what :func:`tokenize_batch` prepares, on another thread if the caller likes, so
    that tokenizing the next batch overlaps the current step."""

    batch: TextBatch
    chunk_size: int | None
    max_length: int | None
    # [column][chunk] -> token tensors of that chunk's texts
    features: list[list[dict[str, torch.Tensor]]]


def tokenize_batch(
    model: BiEncoder, batch: TextBatch, chunk_size: int | None, max_length: int | None
) -> TokenizedBatch:
    """Tokenize every column of ``batch`` in chunks of ``chunk_size`` texts (one chunk per
    column when None), truncated to ``max_length``, as :func:`train_step` will embed them."""
    features = [
        [_tokenize(model, texts, kind, max_length) for texts in _chunks(column, chunk_size)]
        for column, kind in zip(batch.columns, batch.kinds, strict=True)
    ]
    return TokenizedBatch(batch, chunk_size, max_length, features)


class ColumnEncoder(nn.Module):
    """The model's forward over several tokenized columns in one call.

    DistributedDataParallel expects one forward call between two backward passes; a step
    embeds its columns (queries, positives, negatives) through this wrapper so that, with
    DDP around it, a step is one call whichever towers the columns use.
    """

    def __init__(self, model: BiEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, features: list[dict[str, torch.Tensor]], kinds: list[Kind]
    ) -> list[torch.Tensor]:
        return [self.model(f, kind) for f, kind in zip(features, kinds, strict=True)]


def _at_least_fp32(embeddings: torch.Tensor) -> torch.Tensor:
    # Losses are computed in at least fp32: half-precision logits lose the small
    # differences that a softmax or a ranking is made of.
    return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))


def _encode(
    encoder: nn.Module,
    features: list[dict[str, torch.Tensor]],
    kinds: list[Kind],
    device: torch.device,
    autocast: torch.dtype | None,
) -> list[torch.Tensor]:
    with _autocast(device, autocast):
        embeddings = encoder(features, kinds)
    return [_at_least_fp32(e) for e in embeddings]


def _embed(
    model: BiEncoder,
    features: dict[str, torch.Tensor],
    kind: Kind,
    autocast: torch.dtype | None,
) -> torch.Tensor:
    with _autocast(model.device, autocast):
        return _at_least_fp32(model(features, kind))


def _check_chunk_size(name: str, chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name} must be a positive number of texts, got {chunk_size}")


def embed_columns(
    model: BiEncoder,
    batch: TextBatch,
    *,
    chunk_size: int | None = None,
    autocast: torch.dtype | None = None,
    max_length: int | None = None,
    counts: TokenCount | None = None,
) -> list[torch.Tensor]:
    """Embed every column of ``batch`` with its tower: one ``[len(column), dim]`` tensor
    each, in at least fp32.

    Differentiable when grad mode is on. ``chunk_size`` embeds at most that many texts per
    forward pass (each chunk padded on its own); with gradients, all chunks' activations
    are kept until the backward, so it bounds the peak of one pass only. ``autocast`` runs
    the forward passes under ``torch.autocast`` with that dtype. ``max_length`` truncates
    the texts shorter than the model's own limit (cheaper training steps). ``counts``, when
    given, adds up the tokens embedded.
    """
    _check_chunk_size("chunk_size", chunk_size)
    columns = []
    for column, kind in zip(batch.columns, batch.kinds, strict=True):
        parts = []
        for texts in _chunks(column, chunk_size):
            features = _to_device(_tokenize(model, texts, kind, max_length), model.device)
            if counts is not None:
                counts.add(features)
            parts.append(_embed(model, features, kind, autocast))
        columns.append(torch.cat(parts))
    return columns


def train_step(
    model: BiEncoder,
    task: Task,
    batch: TextBatch | TokenizedBatch,
    *,
    cache_chunk_size: int | None = None,
    autocast: torch.dtype | None = None,
    max_length: int | None = None,
    encoder: nn.Module | None = None,
) -> StepResult:
    """Compute ``task``'s loss on ``batch`` and backpropagate it.

    Gradients accumulate into the model's and the task's parameters; the caller steps the
    optimiser and zeroes them. Without ``cache_chunk_size`` every column is embedded with
    its graph at once. With it, GradCache embeds ``cache_chunk_size`` texts at a time (see
    the module docstring): the same gradients, with activation memory bounded by one
    chunk whatever the batch size. ``autocast`` is a dtype for ``torch.autocast`` around
    the encoder's forward passes; the loss itself is computed in fp32. ``max_length``
    truncates the texts for this step only (the model's saved limit is unchanged).

    ``batch`` may come tokenized already (:func:`tokenize_batch`, with the same
    ``cache_chunk_size`` and ``max_length``), e.g. by a thread that prepared it during the
    previous step.

    ``encoder`` embeds tokenized columns with gradients: a :class:`ColumnEncoder` of
    ``model`` by default, the same wrapped in DistributedDataParallel on several ranks
    (``batch`` is then this rank's shard, and GradCache defers DDP's gradient all-reduce to
    the last chunk with ``no_sync``).
    """
    _check_chunk_size("cache_chunk_size", cache_chunk_size)
    if isinstance(batch, TokenizedBatch):
        if (batch.chunk_size, batch.max_length) != (cache_chunk_size, max_length):
            raise ValueError(
                f"the batch was tokenized for chunk_size={batch.chunk_size}, max_length="
                f"{batch.max_length}; this step uses {cache_chunk_size}, {max_length}"
            )
        tokenized = batch
    else:
        tokenized = tokenize_batch(model, batch, cache_chunk_size, max_length)
    encoder = encoder or ColumnEncoder(model)
    counts = TokenCount()
    for column in tokenized.features:
        for features in column:
            counts.add(features)
    if cache_chunk_size is None:
        features = [_to_device(column, model.device) for (column,) in tokenized.features]
        embeddings = _encode(encoder, features, tokenized.batch.kinds, model.device, autocast)
        loss, stats = task(embeddings, tokenized.batch)
        loss.backward()
    else:
        loss, stats = _grad_cache_step(model, task, tokenized, autocast, encoder)
    return StepResult(loss.item(), stats, counts.tokens, counts.seq_len_max)


@dataclass
class _Chunk:
    """What the second GradCache pass needs to embed a chunk again, identically."""

    column: int
    rows: slice
    features: dict[str, torch.Tensor]
    kind: Kind
    random_state: RandomState


def _grad_cache_step(
    model: BiEncoder,
    task: Task,
    tokenized: TokenizedBatch,
    autocast: torch.dtype | None,
    encoder: nn.Module,
) -> tuple[torch.Tensor, dict[str, float]]:
    batch = tokenized.batch
    chunks: list[_Chunk] = []
    columns: list[torch.Tensor] = []
    with torch.no_grad():
        for index, (column, kind) in enumerate(zip(tokenized.features, batch.kinds, strict=True)):
            parts = []
            start = 0
            for cpu_features in column:
                features = _to_device(cpu_features, model.device)
                rows = slice(start, start + len(features["input_ids"]))
                chunks.append(_Chunk(index, rows, features, kind, RandomState(model.device)))
                parts.append(_embed(model, features, kind, autocast))
                start = rows.stop
            columns.append(torch.cat(parts))

    leaves = [embeddings.requires_grad_() for embeddings in columns]
    loss, stats = task(leaves, batch)
    loss.backward()

    # A column the loss ignores has no gradient to pass on, and needs no second pass.
    chunks = [chunk for chunk in chunks if leaves[chunk.column].grad is not None]
    no_sync = getattr(encoder, "no_sync", contextlib.nullcontext)
    for number, chunk in enumerate(chunks, 1):
        # Under DDP, gradients are all-reduced once, with the last chunk's backward.
        with no_sync() if number < len(chunks) else contextlib.nullcontext():
            with chunk.random_state.replay():
                (embeddings,) = _encode(
                    encoder, [chunk.features], [chunk.kind], model.device, autocast
                )
            embeddings.backward(leaves[chunk.column].grad[chunk.rows])
    return loss.detach(), stats
