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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class StepResult:
    """What one training step reports: the loss and the task's statistics, as 0-d tensors
    on the model's device, and what the encoder saw, counted on the host when the texts
    were tokenized: ``tokens`` (non-padding tokens embedded, summed over every column) and
    ``seq_len_max`` (the longest text after truncation).

    The tensors are left unread: on a GPU each read waits for the device, so the caller
    reads everything it needs once (the trainer stacks them into one transfer)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    tokens: int
    seq_len_max: int


def _pinned(model: BiEncoder, features: dict[str, Any]) -> dict[str, Any]:
    """Token tensors in pinned memory when they are bound for a GPU: a pinned copy can run
    asynchronously (``non_blocking``) while the host goes on."""
    if model.device.type == "cuda":
        return {name: t.pin_memory() for name, t in features.items()}
    return features


def _to_device(features: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {name: t.to(device, non_blocking=True) for name, t in features.items()}


@dataclass
class Chunk:
    """Texts of one column embedded in one forward pass: ``rows`` says which rows of the
    column they are (a slice, or an int64 index tensor when texts were regrouped by
    length), ``features`` holds their tokens and packing."""

    rows: slice | torch.Tensor
    features: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.features["input_ids"])

    def to(self, device: torch.device) -> Chunk:
        rows = self.rows
        if isinstance(rows, torch.Tensor):
            rows = rows.to(device, non_blocking=True)
        return Chunk(rows, _to_device(self.features, device))


def token_budget_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped so that each group, padded to its longest text,
    holds at most ``budget`` tokens: texts sorted longest first (ties in input order)
    and cut greedily, so each group pads little. A text longer than the budget is a group
    of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        # Sorted longest first, a group's first text sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _column_chunks(
    model: BiEncoder,
    texts: list[str],
    kind: Kind,
    chunk_size: int | None,
    chunk_tokens: int | None,
    max_length: int | None,
) -> tuple[list[Chunk], torch.Tensor | None]:
    """A column's chunks, and the permutation that puts their concatenated rows back in
    column order (None when the chunks are the column's consecutive slices)."""
    if chunk_tokens is None:
        step = chunk_size or max(len(texts), 1)
        chunks = []
        for start in range(0, len(texts), step):
            part = texts[start : start + step]
            features = _pinned(model, model.tokenize(part, kind, max_length))
            chunks.append(Chunk(slice(start, start + len(part)), features))
        return chunks, None
    tokens = model.token_ids(texts, kind, max_length)
    groups = token_budget_groups([len(ids) for ids in tokens["input_ids"]], chunk_tokens)
    chunks = [Chunk(torch.tensor(rows), _pinned(model, model.pad(tokens, rows))) for rows in groups]
    order = torch.tensor([row for rows in groups for row in rows], dtype=torch.long)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(len(order))
    return chunks, restore


@dataclass
class TokenizedBatch:
    """A batch with its texts already tokenized, column by column and chunk by chunk, on the
    CPU, with everything the step needs from the host (packings, row orders, counts): what
    :func:`tokenize_batch` prepares, on another thread if the caller likes, so that
    tokenizing the next batch overlaps the current step."""

    batch: TextBatch
    chunk_size: int | None
    chunk_tokens: int | None
    max_length: int | None
    chunks: list[list[Chunk]]  # [column][chunk]
    # [column]: the permutation from chunk order back to column order, or None
    restore: list[torch.Tensor | None]
    tokens: int
    seq_len_max: int


def tokenize_batch(
    model: BiEncoder,
    batch: TextBatch,
    chunk_size: int | None,
    max_length: int | None,
    chunk_tokens: int | None = None,
) -> TokenizedBatch:
    """Tokenize every column of ``batch`` as :func:`train_step` will embed it: in chunks
    of ``chunk_size`` texts, or of at most ``chunk_tokens`` padded tokens with texts
    grouped by length, or one chunk per column when both are None; truncated to
    ``max_length``."""
    _check_chunking(chunk_size, chunk_tokens)
    chunks, restore = [], []
    for column, kind in zip(batch.columns, batch.kinds, strict=True):
        parts, order = _column_chunks(model, column, kind, chunk_size, chunk_tokens, max_length)
        chunks.append(parts)
        restore.append(order)
    packings = [chunk.features["packing"] for column in chunks for chunk in column]
    tokens = sum(p.tokens for p in packings)
    longest = max((p.longest for p in packings), default=0)
    return TokenizedBatch(
        batch, chunk_size, chunk_tokens, max_length, chunks, restore, tokens, longest
    )


def _assemble(parts: list[torch.Tensor], restore: torch.Tensor | None) -> torch.Tensor:
    """A column's embeddings in column order from its chunks' (in chunk order)."""
    column = torch.cat(parts)
    if restore is None:
        return column
    return column.index_select(0, restore.to(column.device, non_blocking=True))


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


def _check_chunking(chunk_size: int | None, chunk_tokens: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"cache_chunk_size must be a positive number of texts, got {chunk_size}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(
            f"cache_chunk_tokens must be a positive number of tokens, got {chunk_tokens}"
        )
    if chunk_size is not None and chunk_tokens is not None:
        raise ValueError(
            "cache_chunk_size and cache_chunk_tokens are two ways to cut a GradCache step "
            f"into chunks; set one, not both (got {chunk_size} and {chunk_tokens})"
        )


def embed_columns(
    model: BiEncoder,
    batch: TextBatch,
    *,
    chunk_size: int | None = None,
    chunk_tokens: int | None = None,
    autocast: torch.dtype | None = None,
    max_length: int | None = None,
) -> list[torch.Tensor]:
    """Embed every column of ``batch`` with its tower: one ``[len(column), dim]`` tensor
    each, in column order and at least fp32.

    Differentiable when grad mode is on. ``chunk_size`` embeds at most that many texts per
    forward pass (each chunk padded on its own), ``chunk_tokens`` at most that many padded
    tokens with texts grouped by length; with gradients, all chunks' activations are kept
    until the backward, so either bounds the peak of one pass only. ``autocast`` runs the
    forward passes under ``torch.autocast`` with that dtype. ``max_length`` truncates the
    texts shorter than the model's own limit (cheaper training steps).
    """
    tokenized = tokenize_batch(model, batch, chunk_size, max_length, chunk_tokens)
    columns = []
    for chunks, restore, kind in zip(tokenized.chunks, tokenized.restore, batch.kinds, strict=True):
        parts = [_embed(model, chunk.to(model.device).features, kind, autocast) for chunk in chunks]
        columns.append(_assemble(parts, restore))
    return columns


def train_step(
    model: BiEncoder,
    task: Task,
    batch: TextBatch | TokenizedBatch,
    *,
    cache_chunk_size: int | None = None,
    cache_chunk_tokens: int | None = None,
    autocast: torch.dtype | None = None,
    max_length: int | None = None,
    encoder: nn.Module | None = None,
) -> StepResult:
    """Compute ``task``'s loss on ``batch`` and backpropagate it.

    Gradients accumulate into the model's and the task's parameters; the caller steps the
    optimiser and zeroes them. Without chunking every column is embedded with its graph at
    once. With ``cache_chunk_size`` (texts per chunk) or ``cache_chunk_tokens`` (padded
    tokens per chunk, texts grouped by length so that chunks pad little), GradCache embeds
    one chunk at a time (see the module docstring): the same gradients, with activation
    memory bounded by one chunk whatever the batch size. ``autocast`` is a dtype for
    ``torch.autocast`` around the encoder's forward passes; the loss itself is computed in
    fp32. ``max_length`` truncates the texts for this step only (the model's saved limit is
    unchanged).

    ``batch`` may come tokenized already (:func:`tokenize_batch`, with the same chunking
    and ``max_length``), e.g. by a thread that prepared it during the previous step.

    ``encoder`` embeds tokenized columns with gradients: a :class:`ColumnEncoder` of
    ``model`` by default, the same wrapped in DistributedDataParallel on several ranks
    (``batch`` is then this rank's shard, and GradCache defers DDP's gradient all-reduce to
    the last chunk with ``no_sync``).

    Nothing here reads a value back from the device: the packing, row orders and token
    counts come from the host with the tokens, and the loss and statistics are returned
    as tensors.
    """
    _check_chunking(cache_chunk_size, cache_chunk_tokens)
    if isinstance(batch, TokenizedBatch):
        made = (batch.chunk_size, batch.chunk_tokens, batch.max_length)
        if made != (cache_chunk_size, cache_chunk_tokens, max_length):
            raise ValueError(
                f"the batch was tokenized for chunk_size={batch.chunk_size}, chunk_tokens="
                f"{batch.chunk_tokens}, max_length={batch.max_length}; this step uses "
                f"{cache_chunk_size}, {cache_chunk_tokens}, {max_length}"
            )
        tokenized = batch
    else:
        tokenized = tokenize_batch(model, batch, cache_chunk_size, max_length, cache_chunk_tokens)
    encoder = encoder or ColumnEncoder(model)
    if cache_chunk_size is None and cache_chunk_tokens is None:
        features = [_to_device(column.features, model.device) for (column,) in tokenized.chunks]
        embeddings = _encode(encoder, features, tokenized.batch.kinds, model.device, autocast)
        loss, stats = task(embeddings, tokenized.batch)
        loss.backward()
    else:
        loss, stats = _grad_cache_step(model, task, tokenized, autocast, encoder)
    return StepResult(loss.detach(), stats, tokenized.tokens, tokenized.seq_len_max)


@dataclass
class _Replay:
    """What the second GradCache pass needs to embed a chunk again, identically."""

    column: int
    chunk: Chunk
    kind: Kind
    random_state: RandomState


def _grad_cache_step(
    model: BiEncoder,
    task: Task,
    tokenized: TokenizedBatch,
    autocast: torch.dtype | None,
    encoder: nn.Module,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = tokenized.batch
    replays: list[_Replay] = []
    columns: list[torch.Tensor] = []
    with torch.no_grad():
        for index, (chunks, restore, kind) in enumerate(
            zip(tokenized.chunks, tokenized.restore, batch.kinds, strict=True)
        ):
            parts = []
            for host_chunk in chunks:
                chunk = host_chunk.to(model.device)
                replays.append(_Replay(index, chunk, kind, RandomState(model.device)))
                parts.append(_embed(model, chunk.features, kind, autocast))
            columns.append(_assemble(parts, restore))

    leaves = [embeddings.requires_grad_() for embeddings in columns]
    loss, stats = task(leaves, batch)
    loss.backward()

    # A column the loss ignores has no gradient to pass on, and needs no second pass.
    replays = [replay for replay in replays if leaves[replay.column].grad is not None]
    no_sync = getattr(encoder, "no_sync", contextlib.nullcontext)
    for number, replay in enumerate(replays, 1):
        # Under DDP, gradients are all-reduced once, with the last chunk's backward.
        with no_sync() if number < len(replays) else contextlib.nullcontext():
            with replay.random_state.replay():
                (embeddings,) = _encode(
                    encoder, [replay.chunk.features], [replay.kind], model.device, autocast
                )
            embeddings.backward(leaves[replay.column].grad[replay.chunk.rows])
    return loss.detach(), stats
