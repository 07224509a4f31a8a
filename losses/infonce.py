"""InfoNCE (in-batch negatives + shared hard negatives) in three implementations.

``q`` [B, D] are queries and ``d`` [N, D] documents with N >= B: ``d[i]`` is the positive of
``q[i]`` and ``d[B:]`` are hard negatives shared by every query (the sentence-transformers
layout). With s = 1/temperature,

    loss_i = logsumexp_j(s·q_i·d_j) − s·q_i·d_i,        loss = mean_i loss_i

``symmetric=True`` averages in the document→query loss over the B positives. ``doc_ids``
[N] removes false negatives: a column j != i with ``doc_ids[j] == doc_ids[i]`` leaves row
i's softmax (and, in the symmetric term, the same rule among the B positives).

The similarities are plain dot products: pass L2-normalised embeddings for cosine logits.

Implementations (``impl``):

* ``"triton"``: the fused kernel of :mod:`kernels.infonce` (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``); memory O(B + N) beyond inputs and gradients.
* ``"torch"``: plain PyTorch over column chunks with an online logsumexp and a backward
  that recomputes each chunk; the rows are blocked by the same chunk_size, so memory is
  one chunk_size × chunk_size tile, at most O(B·chunk_size). The CPU default.
* ``"naive"``: ``q @ d.T`` and ``F.cross_entropy``; memory O(B·N). The reference.
* ``"auto"``: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise.

All three return the mean loss in at least fp32 (fp16/bf16 inputs are accumulated in
fp32) and pass gradients to q, d and, when it is a tensor, the temperature.

With ``return_stats=True`` each also returns :class:`InfoNCEStats`, per-query ranking
statistics of the query→document direction taken from the same pass as the loss: O(B)
memory in the "torch" and "triton" paths, and the same loss and gradients as without them.

The "torch" and "triton" paths (so "auto") run as the custom operator
``torch.ops.biencoder.info_nce``, whose backward is ``torch.ops.biencoder.info_nce_backward``:
``torch.compile(fullgraph=True)`` traces a function calling :func:`info_nce` and its
backward without a graph break. Both ops are registered when this module is imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("auto", "triton", "torch", "naive")


@dataclass(frozen=True)
class InfoNCEStats:
    """Per-query ranking statistics of the query→document direction, O(B).

    "Other" columns of row i are the columns j != i that are not false negatives of q_i,
    i.e. the competitors in row i's softmax. All tensors are detached and live on the
    inputs' device.
    """

    positive: torch.Tensor
    """[B] fp32: q_i·d_i, the unscaled similarity (not divided by the temperature)."""
    best_other: torch.Tensor
    """[B] fp32: the largest q_i·d_j over the other columns j; −inf when row i has none."""
    best_other_index: torch.Tensor
    """[B] int64: the column j of ``best_other`` (the first one on ties); −1 when none."""
    false_negatives: torch.Tensor
    """[B] int64: columns j != i with doc_ids[j] == doc_ids[i] (all 0 without doc_ids)."""
    num_docs: int
    """N, the number of columns."""
    num_positives: int | None = None
    """How many leading columns are positives (B); None = one per row. Set where the rows
    are a part of a larger batch whose columns were gathered (training on several ranks)."""

    def with_columns(self, columns: torch.Tensor, num_positives: int) -> InfoNCEStats:
        """These statistics with ``best_other_index`` mapped through ``columns`` (column j
        of the loss was column ``columns[j]`` of the batch) and ``num_positives`` set."""
        found = self.best_other_index >= 0
        index = torch.where(
            found, columns.to(self.best_other_index.device)[self.best_other_index.clamp_min(0)], -1
        )
        return dataclasses.replace(self, best_other_index=index, num_positives=num_positives)

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats, with one host synchronisation.

        * ``accuracy``: fraction of rows whose positive beats every other column strictly.
          A tie counts as wrong (the positive is not ranked first unambiguously); a row with
          no other column counts as right.
        * ``margin``: mean of positive − best_other over the rows that have another column;
          omitted when no row has one.
        * ``false_negative_fraction``: masked false negatives among the B·(N−1) off-diagonal
          pairs; 0.0 when N == 1.
        * ``hardest_negative_mined_fraction``: among the rows that have another column, the
          fraction whose hardest competitor is a mined hard negative (column >= B) rather
          than another query's positive; omitted when N == B or no row has another column.
        """
        batch = self.positive.shape[0]
        positives = batch if self.num_positives is None else self.num_positives
        has_other = self.best_other_index >= 0
        beats_others = (self.positive > self.best_other) | ~has_other
        margins = torch.where(has_other, self.positive - self.best_other, 0.0)
        mined = has_other & (self.best_other_index >= positives)
        accuracy, margin_sum, rows_with_other, false_negatives, mined_rows = torch.stack(
            [
                beats_others.double().mean(),
                margins.double().sum(),
                has_other.double().sum(),
                self.false_negatives.double().sum(),
                mined.double().sum(),
            ]
        ).tolist()
        pairs = batch * (self.num_docs - 1)
        summary = {
            "accuracy": accuracy,
            "false_negative_fraction": false_negatives / pairs if pairs else 0.0,
        }
        if rows_with_other:
            summary["margin"] = margin_sum / rows_with_other
            if self.num_docs > positives:
                summary["hardest_negative_mined_fraction"] = mined_rows / rows_with_other
        return summary


def check_inputs(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
    """Raises ValueError unless q [B, D], d [N, D] with N >= B and doc_ids [N] fit."""
    if q.dim() != 2 or d.dim() != 2:
        raise ValueError(f"q and d must be 2-D, got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"q and d must share the embedding dim, got {q.shape[1]} != {d.shape[1]}")
    if d.shape[0] < q.shape[0]:
        raise ValueError(f"d needs one positive per query: N={d.shape[0]} < B={q.shape[0]}")
    if doc_ids is not None and doc_ids.shape != (d.shape[0],):
        raise ValueError(f"doc_ids must have shape ({d.shape[0]},), got {tuple(doc_ids.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 logits lose the small differences the softmax is made of; fp64 stays fp64 so
    # that gradcheck sees exact arithmetic.
    return torch.promote_types(dtype, torch.float32)


def _false_negatives(
    doc_ids: torch.Tensor, rows: slice, col_start: int, col_stop: int
) -> torch.Tensor:
    """Mask of the (i, j) in rows × [col_start, col_stop), j != i, that share a doc id."""
    same_doc = doc_ids[rows, None] == doc_ids[None, col_start:col_stop]
    # Tile element (a, b) is (rows.start + a, col_start + b): i == j on this diagonal.
    same_doc.diagonal(offset=rows.start - col_start).fill_(False)
    return same_doc


def _dense_stats(similarities: torch.Tensor, false_negatives: torch.Tensor | None) -> InfoNCEStats:
    """Ranking statistics from the full B×N similarity matrix (the reference's way)."""
    batch, num_docs = similarities.shape
    rows = torch.arange(batch, device=similarities.device)
    others = similarities.detach().float().clone()
    others[rows, rows] = -math.inf
    if false_negatives is not None:
        others.masked_fill_(false_negatives, -math.inf)
    best_other, best_other_index = others.max(dim=1)
    has_other = best_other > -math.inf
    return InfoNCEStats(
        positive=similarities.detach()[rows, rows].float(),
        best_other=best_other,
        best_other_index=torch.where(has_other, best_other_index, -1),
        false_negatives=(
            false_negatives.sum(dim=1)
            if false_negatives is not None
            else torch.zeros(batch, dtype=torch.int64, device=similarities.device)
        ),
        num_docs=num_docs,
    )


def naive_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """Reference InfoNCE: materialises the B×N logits and calls ``F.cross_entropy``."""
    check_inputs(q, d, doc_ids)
    batch = q.shape[0]
    similarities = (q @ d.T).to(_compute_dtype(q.dtype))
    logits = similarities * scale
    mask = None
    if doc_ids is not None:
        mask = _false_negatives(doc_ids, slice(0, batch), 0, d.shape[0])
        logits = logits.masked_fill(mask, -math.inf)
    labels = torch.arange(batch, device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits[:, :batch].T, labels)) / 2
    if return_stats:
        return loss, _dense_stats(similarities, mask)
    return loss


def _tile_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A contiguous prefix of one flat buffer, so every tile (the narrower edge tiles too)
    # reuses the same memory instead of page-faulting a fresh allocation per tile.
    return buffer[: rows * cols].view(rows, cols)


def _column_chunks(docs: torch.Tensor, scale: torch.Tensor, chunk_size: int):
    """(col_start, col_stop, scale·docs[col_start:col_stop]) per chunk of document rows."""
    for col_start in range(0, docs.shape[0], chunk_size):
        col_stop = min(col_start + chunk_size, docs.shape[0])
        yield col_start, col_stop, docs[col_start:col_stop] * scale


def _row_chunks(num_rows: int, chunk_size: int):
    for row_start in range(0, num_rows, chunk_size):
        yield slice(row_start, min(row_start + chunk_size, num_rows))


class _TileStats:
    """Running ranking statistics of the q→d rows, updated from each scaled logit tile.

    O(B) state (plus an O(N) count of the doc ids): each tile is read in place, its diagonal
    set to −inf for the max over the other columns and restored bit for bit before the
    logsumexp reads the tile.
    """

    def __init__(
        self, queries: torch.Tensor, scale: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> None:
        batch = queries.shape[0]
        self.scale = scale
        self.positive = queries.new_empty(batch)
        self.best_other = queries.new_full((batch,), -math.inf)
        self.best_other_index = torch.full((batch,), -1, dtype=torch.int64, device=queries.device)
        # Counted from the ids rather than from the tiles: a bool row sum per tile costs
        # about as much as the tile's matmul on a CPU.
        if doc_ids is None:
            self.false_negatives = torch.zeros_like(self.best_other_index)
        else:
            _, inverse, counts = torch.unique(doc_ids, return_inverse=True, return_counts=True)
            self.false_negatives = counts[inverse[:batch]] - 1

    def update(self, logits: torch.Tensor, rows: slice, col_start: int) -> None:
        """Folds in one tile of logits with false negatives at −inf, rows × [col_start, …)."""
        first, last = max(rows.start, col_start), min(rows.stop, col_start + logits.shape[1])
        diagonal = logits.diagonal(offset=rows.start - col_start)
        if first < last:
            self.positive[first:last] = diagonal
            diagonal.fill_(-math.inf)
        tile_best, tile_index = logits.max(dim=1)
        if first < last:
            diagonal.copy_(self.positive[first:last])
        # Strictly greater: a later tile only wins with a larger value, so ties keep the
        # first column, and a row whose tiles are all −inf keeps index −1.
        best, index = self.best_other[rows], self.best_other_index[rows]
        improved = tile_best > best
        best.copy_(torch.where(improved, tile_best, best))
        index.copy_(torch.where(improved, tile_index + col_start, index))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor fields of :class:`InfoNCEStats`, in order (autograd outputs)."""
        # The tiles hold s·q·d; dividing by the same s keeps the order of the values.
        return (
            (self.positive / self.scale).float(),
            (self.best_other / self.scale).float(),
            self.best_other_index,
            self.false_negatives,
        )


def _chunked_logsumexp(
    queries: torch.Tensor,
    docs: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    chunk_size: int,
    buffer: torch.Tensor,
    stats: _TileStats | None = None,
) -> torch.Tensor:
    """Row logsumexp of scale·queries·docsᵀ (false negatives excluded), tile by tile.

    ``stats``, when given, is updated from the same tiles before their logsumexp.
    """
    lse = queries.new_full((queries.shape[0],), -math.inf)
    for col_start, col_stop, scaled_docs in _column_chunks(docs, scale, chunk_size):
        for rows in _row_chunks(queries.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            logits = torch.mm(queries[rows], scaled_docs.T, out=tile)
            if doc_ids is not None:
                excluded = _false_negatives(doc_ids, rows, col_start, col_stop)
                logits.masked_fill_(excluded, -math.inf)
            if stats is not None:
                stats.update(logits, rows, col_start)
            # Clamped so that a row whose whole tile is excluded gives exp(−inf) = 0, not nan.
            tile_max = logits.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(logits.dtype).min)
            tile_lse = logits.sub_(tile_max).exp_().sum(dim=1).log_().add_(tile_max[:, 0])
            lse[rows] = torch.logaddexp(lse[rows], tile_lse)
    return lse


def _chunked_softmax_products(
    queries: torch.Tensor,
    docs: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    lse: torch.Tensor,
    chunk_size: int,
    buffer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P @ docs, Pᵀ @ queries) for the softmax rows P, recomputing P tile by tile."""
    p_docs = torch.zeros_like(queries)
    pt_queries = torch.zeros_like(docs)
    for col_start, col_stop, scaled_docs in _column_chunks(docs, scale, chunk_size):
        for rows in _row_chunks(queries.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            probs = torch.mm(queries[rows], scaled_docs.T, out=tile)
            probs.sub_(lse[rows, None]).exp_()
            if doc_ids is not None:
                probs.masked_fill_(_false_negatives(doc_ids, rows, col_start, col_stop), 0.0)
            p_docs[rows].addmm_(probs, docs[col_start:col_stop])
            pt_queries[col_start:col_stop].addmm_(probs.T, queries[rows])
    return p_docs, pt_queries


def _tile_buffer(queries: torch.Tensor, docs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    rows = min(chunk_size, queries.shape[0])
    return queries.new_empty(rows * min(chunk_size, docs.shape[0]))


def _chunked_forward(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    symmetric: bool,
    chunk_size: int,
    return_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """(loss, row_lse, col_lse, stats tensors) of the chunked path; lse are O(B)."""
    compute_dtype = _compute_dtype(q.dtype)
    queries, docs = q.to(compute_dtype), d.to(compute_dtype)
    scale = scale.to(compute_dtype)
    batch = queries.shape[0]
    # Before the tile buffer exists, so that this B×D temporary does not add to the peak.
    positive_logits = (queries * docs[:batch]).sum(dim=1) * scale
    buffer = _tile_buffer(queries, docs, chunk_size)
    stats = _TileStats(queries, scale, doc_ids) if return_stats else None
    row_lse = _chunked_logsumexp(queries, docs, scale, doc_ids, chunk_size, buffer, stats)
    loss = (row_lse - positive_logits).mean()
    col_lse = None
    if symmetric:
        positive_ids = doc_ids[:batch] if doc_ids is not None else None
        col_lse = _chunked_logsumexp(docs[:batch], queries, scale, positive_ids, chunk_size, buffer)
        loss = (loss + (col_lse - positive_logits).mean()) / 2
    return loss, row_lse, col_lse, stats.tensors() if stats is not None else None


def _chunked_backward(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of the chunked path, recomputing each logit tile once.

    With a uniform upstream weight w = G/B, dlogits = w·(P − I), so the onehot and the
    weight are applied to the B×D products (P @ d − d[:B]) instead of to each B×chunk tile;
    ∂/∂s = Σ dlogits·(q·dᵀ) = ⟨q, dlogits @ d⟩ reuses the same product.
    """
    compute_dtype = _compute_dtype(q.dtype)
    queries, docs = q.to(compute_dtype), d.to(compute_dtype)
    scale = scale.to(compute_dtype)
    batch = queries.shape[0]
    weight = grad_loss.to(compute_dtype) / (batch if col_lse is None else 2 * batch)
    buffer = _tile_buffer(queries, docs, chunk_size)

    p_docs, pt_queries = _chunked_softmax_products(
        queries, docs, scale, doc_ids, row_lse, chunk_size, buffer
    )
    dq = p_docs.sub_(docs[:batch])
    dd = pt_queries
    dd[:batch] -= queries
    dscale = torch.dot(queries.flatten(), dq.flatten())
    if col_lse is not None:
        positives = docs[:batch]
        positive_ids = doc_ids[:batch] if doc_ids is not None else None
        p_queries, pt_positives = _chunked_softmax_products(
            positives, queries, scale, positive_ids, col_lse, chunk_size, buffer
        )
        d_positives = p_queries.sub_(queries)
        dscale = dscale + torch.dot(positives.flatten(), d_positives.flatten())
        dq += pt_positives.sub_(positives)
        dd[:batch] += d_positives
    return dq.mul_(weight * scale).to(q.dtype), dd.mul_(weight * scale).to(d.dtype), dscale * weight


# ------------------------------------------------------------------------------------------
# The loss as a custom operator, so that torch.compile sees one node with known output
# shapes (the fake) and a known backward (itself an op, so AOTAutograd traces it), instead
# of tracing into the implementations: their chunk loops would unroll into the graph for
# every shape, and the statistics' data-dependent torch.unique breaks the graph. Both the
# chunked and the fused path run behind it: `fused`
# picks the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), otherwise the chunked
# PyTorch code runs on whatever device the tensors are on. Custom ops return a fixed tuple
# of tensors, so absent outputs (col_lse without `symmetric`, the statistics without
# `return_stats`) are empty tensors.
# ------------------------------------------------------------------------------------------


def _fused_kernels():
    # Imported on first use: importing the kernels decides whether Triton interprets them.
    from kernels import infonce

    return infonce


@torch.library.custom_op("biencoder::info_nce", mutates_args=())
def info_nce_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    symmetric: bool,
    return_stats: bool,
    fused: bool,
    deterministic: bool,
    chunk_size: int,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(loss, row_lse, col_lse, positive, best_other, best_other_index, false_negatives)``.

    ``scale`` is a 0-dim tensor (it may require grad); ``fused`` runs the Triton kernels,
    whose backward accumulates dd atomically unless ``deterministic``; ``chunk_size`` is
    the chunked path's tile. row_lse and col_lse are what the backward needs; col_lse is
    empty unless ``symmetric`` and the four statistics are empty unless ``return_stats``.
    Use :func:`info_nce`, which validates the arguments and wraps the statistics.
    """
    if fused:
        result = _fused_kernels().infonce_forward(
            q, d, scale, doc_ids, symmetric, return_stats=return_stats
        )
        loss, row_lse, col_lse = result.loss, result.row_lse, result.col_lse
        stats = result.stats
        stats_tensors = (
            (stats.positive, stats.best_other, stats.best_other_index, stats.false_negatives)
            if stats is not None
            else None
        )
    else:
        loss, row_lse, col_lse, stats_tensors = _chunked_forward(
            q, d, scale, doc_ids, symmetric, chunk_size, return_stats
        )
    if col_lse is None:
        col_lse = row_lse.new_empty(0)
    if stats_tensors is None:
        empty = row_lse.new_empty(0, dtype=torch.float32)
        no_rows = torch.empty(0, dtype=torch.int64, device=q.device)
        stats_tensors = (empty, empty.clone(), no_rows, no_rows.clone())
    return loss, row_lse, col_lse, *stats_tensors


@info_nce_op.register_fake
def _info_nce_fake(q, d, scale, doc_ids, symmetric, return_stats, fused, deterministic, chunk_size):
    batch = q.shape[0]
    dtype = _compute_dtype(q.dtype)
    stats_rows = batch if return_stats else 0
    return (
        q.new_empty((), dtype=dtype),
        q.new_empty(batch, dtype=dtype),
        q.new_empty(batch if symmetric else 0, dtype=dtype),
        q.new_empty(stats_rows, dtype=torch.float32),
        q.new_empty(stats_rows, dtype=torch.float32),
        q.new_empty(stats_rows, dtype=torch.int64),
        q.new_empty(stats_rows, dtype=torch.int64),
    )


@torch.library.custom_op("biencoder::info_nce_backward", mutates_args=())
def info_nce_backward_op(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor | None,
    fused: bool,
    deterministic: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of ``info_nce_op``'s loss for the upstream gradient ``grad_loss``;
    the symmetric term is included when ``col_lse`` is given."""
    if fused:
        dq, dd, dscale = _fused_kernels().infonce_backward(
            q, d, scale, grad_loss, row_lse, col_lse, doc_ids, deterministic
        )
    else:
        dq, dd, dscale = _chunked_backward(
            grad_loss, q, d, scale, doc_ids, row_lse, col_lse, chunk_size
        )
    # Contiguous like the fake outputs, whatever the strides of q and d.
    return dq.contiguous(), dd.contiguous(), dscale.to(scale.dtype).reshape(scale.shape)


@info_nce_backward_op.register_fake
def _info_nce_backward_fake(
    grad_loss, q, d, scale, doc_ids, row_lse, col_lse, fused, deterministic, chunk_size
):
    return q.new_empty(q.shape), d.new_empty(d.shape), scale.new_empty(scale.shape)


def _info_nce_setup_context(ctx, inputs, output) -> None:
    q, d, scale, doc_ids, symmetric, _, fused, deterministic, chunk_size = inputs
    _, row_lse, col_lse, *stats_tensors = output
    ctx.mark_non_differentiable(row_lse, col_lse, *stats_tensors)
    # The inputs and O(B) logsumexps only: the backward recomputes the logits.
    ctx.save_for_backward(q, d, scale, doc_ids, row_lse, col_lse if symmetric else None)
    ctx.fused, ctx.deterministic, ctx.chunk_size = fused, deterministic, chunk_size


def _info_nce_backward(ctx, grad_loss, *_other_grads):
    q, d, scale, doc_ids, row_lse, col_lse = ctx.saved_tensors
    dq, dd, dscale = info_nce_backward_op(
        grad_loss,
        q,
        d,
        scale,
        doc_ids,
        row_lse,
        col_lse,
        ctx.fused,
        ctx.deterministic,
        ctx.chunk_size,
    )
    return dq, dd, dscale, None, None, None, None, None, None


info_nce_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)


def scale_as_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The scale 1/temperature as the 0-dim tensor ``info_nce_op`` takes, on ``device``; a
    tensor keeps its dtype and its gradient."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.to(device).reshape(())
    # fp64 so that the fp64 (gradcheck) path sees 1/temperature unrounded; the kernels and
    # the fp32 chunked path round it to fp32 as before.
    return torch.tensor(float(scale), device=device, dtype=torch.float64)


def call_info_nce_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    symmetric: bool,
    return_stats: bool,
    fused: bool,
    deterministic: bool = True,
    chunk_size: int = 4096,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """``info_nce_op`` with its outputs as the public functions return them: the loss, or
    ``(loss, InfoNCEStats)`` with ``return_stats``."""
    loss, _, _, *stats_tensors = info_nce_op(
        q, d, scale, doc_ids, symmetric, return_stats, fused, deterministic, chunk_size
    )
    if not return_stats:
        return loss
    return loss, InfoNCEStats(*stats_tensors, num_docs=d.shape[0])


def chunked_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    chunk_size: int = 4096,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """InfoNCE in plain PyTorch, ``chunk_size`` × ``chunk_size`` logits at a time.

    Peak extra memory is one such tile (plus a bool mask of that size with ``doc_ids``)
    besides the inputs and their gradients; the backward recomputes each tile's logits once
    and takes both gradient products from it. ``return_stats`` adds :class:`InfoNCEStats`
    from the forward's own tiles (O(B) more memory; loss and gradients unchanged).
    """
    check_inputs(q, d, doc_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return call_info_nce_op(
        q,
        d,
        scale_as_tensor(scale, q.device),
        doc_ids,
        symmetric,
        return_stats,
        fused=False,
        chunk_size=chunk_size,
    )


def info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 4096,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """Mean InfoNCE loss of queries ``q`` [B, D] against documents ``d`` [N, D].

    ``temperature`` is a float or a scalar tensor (learnable: it receives a gradient in every
    implementation). ``impl`` is one of ``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``
    (see the module docstring); ``chunk_size`` only applies to ``"torch"``.

    ``return_stats=True`` returns ``(loss, InfoNCEStats)``: the query→document ranking
    statistics (also when ``symmetric``), computed in the loss's own forward pass, detached.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    scale = 1.0 / temperature
    if impl == "triton":
        # The op directly rather than kernels.infonce.fused_info_nce, so that torch.compile
        # traces no import here; the op imports the kernels when it first runs.
        check_inputs(q, d, doc_ids)
        return call_info_nce_op(
            q, d, scale_as_tensor(scale, q.device), doc_ids, symmetric, return_stats, fused=True
        )
    if impl == "torch":
        return chunked_info_nce(q, d, scale, symmetric, doc_ids, chunk_size, return_stats)
    return naive_info_nce(q, d, scale, symmetric, doc_ids, return_stats)


class InfoNCELoss(nn.Module):
    """InfoNCE as a module, optionally with a learnable temperature.

    A learnable temperature is stored CLIP-style as the log of the scale 1/temperature and
    clamped to temperatures in [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``], so that the logits
    can neither blow up nor flatten to a uniform softmax.
    """

    MIN_TEMPERATURE = 0.01
    MAX_TEMPERATURE = 1.0
    expects_normalized = True

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not self.MIN_TEMPERATURE <= temperature <= self.MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [{self.MIN_TEMPERATURE}, {self.MAX_TEMPERATURE}],"
                f" got {temperature}"
            )
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.symmetric = symmetric
        self.impl = impl
        if learnable_temperature:
            self.log_scale = nn.Parameter(torch.tensor(-math.log(temperature)))
        else:
            self.register_parameter("log_scale", None)
            self._fixed_temperature = temperature

    @property
    def temperature(self) -> float | torch.Tensor:
        """The temperature: a float if fixed, a differentiable 0-dim tensor if learnable."""
        if self.log_scale is None:
            return self._fixed_temperature
        log_scale = self.log_scale.clamp(
            -math.log(self.MAX_TEMPERATURE), -math.log(self.MIN_TEMPERATURE)
        )
        return torch.exp(-log_scale)

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        return_stats: bool = False,
        queries: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
        """The loss, or ``(loss, InfoNCEStats)`` with ``return_stats`` (see :func:`info_nce`).

        ``queries`` [M, D], M >= B, replaces ``q`` as what the symmetric (document→query)
        term ranks each positive ``d[i]`` against: ``queries[i]`` is its own query, the rest
        compete with it, and ``query_ids`` [M] (the doc ids of the queries' positives) masks
        false negatives among them as ``doc_ids[:B]`` does by default. Training on several
        ranks passes the queries of the whole batch here, this rank's first.
        """
        if queries is None:
            return info_nce(
                q,
                d,
                self.temperature,
                symmetric=self.symmetric,
                doc_ids=doc_ids,
                impl=self.impl,
                return_stats=return_stats,
            )
        forward = info_nce(
            q,
            d,
            self.temperature,
            doc_ids=doc_ids,
            impl=self.impl,
            return_stats=return_stats,
        )
        if not self.symmetric:
            return forward
        loss, stats = forward if return_stats else (forward, None)
        backward = info_nce(
            d[: q.shape[0]], queries, self.temperature, doc_ids=query_ids, impl=self.impl
        )
        loss = (loss + backward) / 2
        return (loss, stats) if return_stats else loss
