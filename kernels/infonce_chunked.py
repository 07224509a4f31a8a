"""The InfoNCE op's implementation without Triton: ``impl="torch"``, the CPU default.

:func:`chunked_forward` and :func:`chunked_backward` are what the custom op
``biencoder::info_nce`` and its backward op (:mod:`kernels.infonce_op`) run when ``fused``
is off, on whatever device the tensors are on. Same math as the Triton kernels of
:mod:`kernels.infonce`, as torch ops over column chunks: one chunk_size × chunk_size logit
tile at a time with an online logsumexp across the chunks, keeping only O(B) statistics
(the row logsumexps, saved for a backward that recomputes each tile once per direction,
and with ``return_stats`` the ranking statistics). The options are defined in
:mod:`losses.infonce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from biencoder.kernels.infonce_options import (
    DIAGONAL_EXCLUDED,
    DIAGONAL_TARGET,
    HARDNESS_CODES,
    Direction,
    LossTerms,
    accumulate_direction_grads,
    combine_partitions,
    compute_dtype_of,
    guide_thresholds,
)


def _false_negatives(
    doc_ids: torch.Tensor, rows: slice, col_start: int, col_stop: int
) -> torch.Tensor:
    """Mask of the (i, j) in rows × [col_start, col_stop), j != i, that share a doc id."""
    same_doc = doc_ids[rows, None] == doc_ids[None, col_start:col_stop]
    # Tile element (a, b) is (rows.start + a, col_start + b): i == j on this diagonal.
    same_doc.diagonal(offset=rows.start - col_start).fill_(False)
    return same_doc


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


@dataclass(frozen=True)
class _ChunkedTerm:
    """One direction of the chunked path: its rows and columns in the compute dtype and
    what decides, per tile, which logits leave the softmax and which get the hardness."""

    spec: Direction
    rows: torch.Tensor
    cols: torch.Tensor
    doc_ids: torch.Tensor | None
    owners: torch.Tensor | None
    guide_rows: torch.Tensor | None
    guide_cols: torch.Tensor | None
    thresholds: torch.Tensor | None
    hardness_strength: float

    @classmethod
    def build(cls, spec, queries, docs, doc_ids, owners, guides, thresholds, terms):
        guide_rows = guide_cols = None
        if guides is not None:
            guide_rows = spec.rows(*guides)
            guide_cols = spec.cols(*guides)
        return cls(
            spec,
            spec.rows(queries, docs),
            spec.cols(queries, docs),
            doc_ids,
            owners,
            guide_rows,
            guide_cols,
            thresholds,
            terms.hardness_strength,
        )

    def _positions(self, rows: slice, col_start: int, col_stop: int):
        device = self.rows.device
        row_index = torch.arange(rows.start, rows.stop, device=device)[:, None]
        col_index = torch.arange(col_start, col_stop, device=device)[None, :]
        return row_index, col_index

    def _mined_by_row(self, rows: slice, col_start: int, col_stop: int) -> torch.Tensor:
        row_index, col_index = self._positions(rows, col_start, col_stop)
        batch = self.rows.shape[0]
        return (col_index >= batch) & (self.owners[None, col_start:col_stop] == row_index)

    def excluded(self, rows: slice, col_start: int, col_stop: int) -> torch.Tensor | None:
        """Bool tile of the logits that leave the softmax, or None when none do."""
        excluded = None
        if self.doc_ids is not None:
            excluded = _false_negatives(self.doc_ids, rows, col_start, col_stop)
        spec = self.spec
        extra = []
        if spec.diagonal == DIAGONAL_EXCLUDED:
            row_index, col_index = self._positions(rows, col_start, col_stop)
            extra.append(row_index == col_index)
        if spec.exclude_own:
            extra.append(self._mined_by_row(rows, col_start, col_stop))
        if self.guide_rows is not None:
            guide_scores = self.guide_rows[rows] @ self.guide_cols[col_start:col_stop].T
            dropped = guide_scores > self.thresholds[rows, None]
            if spec.diagonal != DIAGONAL_EXCLUDED:
                dropped.diagonal(offset=rows.start - col_start).fill_(False)
            extra.append(dropped)
        for mask in extra:
            excluded = mask if excluded is None else excluded | mask
        return excluded

    def add_hardness_(
        self, logits: torch.Tensor, scale: torch.Tensor, rows: slice, col_start: int, col_stop: int
    ) -> None:
        """logits += α·q·d on the penalised columns, in place: with logits = s·q·d that is
        logits·(α/s) added where selected, so no second product is needed."""
        code = self.spec.hardness
        if not code:
            return
        row_index, col_index = self._positions(rows, col_start, col_stop)
        not_positive = row_index != col_index
        if code == HARDNESS_CODES["all_negatives"]:
            selected = not_positive
        else:
            mined = self._mined_by_row(rows, col_start, col_stop)
            selected = mined if code == HARDNESS_CODES["hard_negatives"] else not_positive & ~mined
        # where, not a product with the mask: excluded logits are −inf and −inf·0 is nan.
        logits.add_(torch.where(selected, logits, 0.0) * (self.hardness_strength / scale))


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
        # about as much as the tile's matmul on a CPU. Each row's id occurs in the sorted
        # ids over [left, right): searchsorted rather than unique, whose output size the
        # host would have to wait for.
        if doc_ids is None:
            self.false_negatives = torch.zeros_like(self.best_other_index)
        else:
            ids, _ = doc_ids.sort()
            mine = doc_ids[:batch].contiguous()
            left = torch.searchsorted(ids, mine)
            right = torch.searchsorted(ids, mine, right=True)
            self.false_negatives = right - left - 1

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
    term: _ChunkedTerm,
    scale: torch.Tensor,
    chunk_size: int,
    buffer: torch.Tensor,
    stats: _TileStats | None = None,
) -> torch.Tensor:
    """Row logsumexp of one direction's logits (exclusions left out), tile by tile.

    ``stats``, when given, is updated from the same tiles (before the hardness term) before
    their logsumexp.
    """
    rows_all = term.rows
    lse = rows_all.new_full((rows_all.shape[0],), -math.inf)
    for col_start, col_stop, scaled_cols in _column_chunks(term.cols, scale, chunk_size):
        for rows in _row_chunks(rows_all.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            logits = torch.mm(rows_all[rows], scaled_cols.T, out=tile)
            excluded = term.excluded(rows, col_start, col_stop)
            if excluded is not None:
                logits.masked_fill_(excluded, -math.inf)
            if stats is not None:
                stats.update(logits, rows, col_start)
            term.add_hardness_(logits, scale, rows, col_start, col_stop)
            # Clamped so that a row whose whole tile is excluded gives exp(−inf) = 0, not nan.
            tile_max = logits.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(logits.dtype).min)
            tile_lse = logits.sub_(tile_max).exp_().sum(dim=1).log_().add_(tile_max[:, 0])
            lse[rows] = torch.logaddexp(lse[rows], tile_lse)
    return lse


def _chunked_softmax_products(
    term: _ChunkedTerm,
    scale: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    buffer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P @ cols, Pᵀ @ rows) for the softmax rows P = exp(logits − lse), recomputing P
    tile by tile."""
    rows_all, cols_all = term.rows, term.cols
    p_cols = torch.zeros_like(rows_all)
    pt_rows = torch.zeros_like(cols_all)
    for col_start, col_stop, scaled_cols in _column_chunks(cols_all, scale, chunk_size):
        for rows in _row_chunks(rows_all.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            probs = torch.mm(rows_all[rows], scaled_cols.T, out=tile)
            term.add_hardness_(probs, scale, rows, col_start, col_stop)
            probs.sub_(lse[rows, None]).exp_()
            excluded = term.excluded(rows, col_start, col_stop)
            if excluded is not None:
                probs.masked_fill_(excluded, 0.0)
            p_cols[rows].addmm_(probs, cols_all[col_start:col_stop])
            pt_rows[col_start:col_stop].addmm_(probs.T, rows_all[rows])
    return p_cols, pt_rows


def _tile_buffer(queries: torch.Tensor, docs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    rows = min(chunk_size, queries.shape[0])
    return queries.new_empty(rows * min(chunk_size, docs.shape[0]))


def _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms):
    """(queries, docs, [_ChunkedTerm per direction]) in the compute dtype."""
    compute_dtype = compute_dtype_of(q.dtype)
    queries, docs = q.to(compute_dtype), d.to(compute_dtype)
    guides = thresholds = None
    if guide_q is not None:
        guides = (guide_q.to(q.dtype).to(compute_dtype), guide_d.to(q.dtype).to(compute_dtype))
        thresholds = guide_thresholds(guide_q, guide_d, terms, q.dtype)
    chunked = [
        _ChunkedTerm.build(spec, queries, docs, doc_ids, doc_owners, guides, thresholds, terms)
        for spec in terms.specs()
    ]
    return queries, docs, chunked


def chunked_forward(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    terms: LossTerms,
    chunk_size: int,
    return_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(loss, lse [num_lse, B], stats tensors) of the chunked path."""
    queries, docs, chunked = _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms)
    scale = scale.to(queries.dtype)
    batch = queries.shape[0]
    # Before the tile buffer exists, so that this B×D temporary does not add to the peak.
    positive_logits = (queries * docs[:batch]).sum(dim=1) * scale
    buffer = _tile_buffer(queries, docs, chunk_size)
    stats = _TileStats(queries, scale, doc_ids) if return_stats else None
    term_lse = [
        _chunked_logsumexp(term, scale, chunk_size, buffer, stats if index == 0 else None)
        for index, term in enumerate(chunked)
    ]
    lse = combine_partitions(term_lse, terms.joint)
    if lse.shape[0] == 1:
        # One partition, joint or the only direction's: loss_i = partition_i − positive_i.
        loss = (lse[0] - positive_logits).mean()
    else:
        loss = sum((row_lse - positive_logits).mean() for row_lse in term_lse) / len(term_lse)
    return loss, lse, stats.tensors() if stats is not None else None


def chunked_backward(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    lse: torch.Tensor,
    terms: LossTerms,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of the chunked path, recomputing each logit tile once per direction.

    Every row has the same upstream weight w = G/B (divided by the number of directions
    per_direction), so dlogits = w·(P − onehot) and the onehot and the weight are applied
    to the B×D products (P @ cols − cols[:B]) instead of to each tile. ∂/∂s =
    Σ dlogits·(rows·colsᵀ) = ⟨rows, dlogits @ cols⟩ reuses the same product; the hardness
    term is a stop-gradient, so it enters only through P.
    """
    queries, docs, chunked = _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms)
    compute_dtype = queries.dtype
    scale = scale.to(compute_dtype)
    batch = queries.shape[0]
    weight = grad_loss.to(compute_dtype) / (batch * (1 if terms.joint else len(chunked)))
    buffer = _tile_buffer(queries, docs, chunk_size)

    totals = None
    for index, term in enumerate(chunked):
        term_lse = lse[0 if terms.joint else index]
        d_rows, d_cols = _chunked_softmax_products(term, scale, term_lse, chunk_size, buffer)
        if term.spec.diagonal == DIAGONAL_TARGET:
            d_rows.sub_(term.cols[:batch])
            d_cols[:batch] -= term.rows
        totals = accumulate_direction_grads(totals, term.spec, term.rows, d_rows, d_cols)
    dq, dd, dscale = totals
    return dq.mul_(weight * scale).to(q.dtype), dd.mul_(weight * scale).to(d.dtype), dscale * weight
