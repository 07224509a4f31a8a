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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("auto", "triton", "torch", "naive")


def _check_inputs(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
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


def naive_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference InfoNCE: materialises the B×N logits and calls ``F.cross_entropy``."""
    _check_inputs(q, d, doc_ids)
    batch = q.shape[0]
    logits = (q @ d.T).to(_compute_dtype(q.dtype)) * scale
    if doc_ids is not None:
        mask = _false_negatives(doc_ids, slice(0, batch), 0, d.shape[0])
        logits = logits.masked_fill(mask, -math.inf)
    labels = torch.arange(batch, device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits[:, :batch].T, labels)) / 2
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


def _chunked_logsumexp(
    queries: torch.Tensor,
    docs: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    chunk_size: int,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Row logsumexp of scale·queries·docsᵀ (false negatives excluded), tile by tile."""
    lse = queries.new_full((queries.shape[0],), -math.inf)
    for col_start, col_stop, scaled_docs in _column_chunks(docs, scale, chunk_size):
        for rows in _row_chunks(queries.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            logits = torch.mm(queries[rows], scaled_docs.T, out=tile)
            if doc_ids is not None:
                excluded = _false_negatives(doc_ids, rows, col_start, col_stop)
                logits.masked_fill_(excluded, -math.inf)
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


class _ChunkedInfoNCE(torch.autograd.Function):
    """Chunked InfoNCE; saves the inputs and the O(B) logsumexps, never the logits.

    With a uniform upstream weight w = G/B, dlogits = w·(P − I), so the onehot and the
    weight are applied to the B×D products (P @ d − d[:B]) instead of to each B×chunk tile;
    ∂/∂s = Σ dlogits·(q·dᵀ) = ⟨q, dlogits @ d⟩ reuses the same product.
    """

    @staticmethod
    def forward(ctx, q, d, scale, doc_ids, symmetric, chunk_size):
        compute_dtype = _compute_dtype(q.dtype)
        queries, docs = q.to(compute_dtype), d.to(compute_dtype)
        scale = scale.to(compute_dtype)
        batch = queries.shape[0]
        # Before the tile buffer exists, so that this B×D temporary does not add to the peak.
        positive_logits = (queries * docs[:batch]).sum(dim=1) * scale
        buffer = _tile_buffer(queries, docs, chunk_size)
        row_lse = _chunked_logsumexp(queries, docs, scale, doc_ids, chunk_size, buffer)
        loss = (row_lse - positive_logits).mean()
        col_lse = None
        if symmetric:
            positive_ids = doc_ids[:batch] if doc_ids is not None else None
            col_lse = _chunked_logsumexp(
                docs[:batch], queries, scale, positive_ids, chunk_size, buffer
            )
            loss = (loss + (col_lse - positive_logits).mean()) / 2
        ctx.save_for_backward(q, d, scale, doc_ids, row_lse, col_lse)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, d, scale, doc_ids, row_lse, col_lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        compute_dtype = _compute_dtype(q.dtype)
        queries, docs = q.to(compute_dtype), d.to(compute_dtype)
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
        return (
            (dq.mul_(weight * scale)).to(q.dtype) if ctx.needs_input_grad[0] else None,
            (dd.mul_(weight * scale)).to(d.dtype) if ctx.needs_input_grad[1] else None,
            (dscale * weight).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def chunked_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """InfoNCE in plain PyTorch, ``chunk_size`` × ``chunk_size`` logits at a time.

    Peak extra memory is one such tile (plus a bool mask of that size with ``doc_ids``)
    besides the inputs and their gradients; the backward recomputes each tile's logits once
    and takes both gradient products from it.
    """
    _check_inputs(q, d, doc_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())
    else:
        # fp64 so that the fp64 (gradcheck) path sees 1/temperature unrounded.
        scale = torch.tensor(float(scale), device=q.device, dtype=torch.float64)
    return _ChunkedInfoNCE.apply(q, d, scale, doc_ids, symmetric, chunk_size)


def info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean InfoNCE loss of queries ``q`` [B, D] against documents ``d`` [N, D].

    ``temperature`` is a float or a scalar tensor (learnable: it receives a gradient in every
    implementation). ``impl`` is one of ``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``
    (see the module docstring); ``chunk_size`` only applies to ``"torch"``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    scale = 1.0 / temperature
    if impl == "triton":
        # Imported here: importing the kernels decides whether Triton runs them interpreted.
        from kernels.infonce import fused_info_nce

        return fused_info_nce(q, d, scale, symmetric=symmetric, doc_ids=doc_ids)
    if impl == "torch":
        return chunked_info_nce(q, d, scale, symmetric, doc_ids, chunk_size)
    return naive_info_nce(q, d, scale, symmetric, doc_ids)


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
        self, q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return info_nce(
            q, d, self.temperature, symmetric=self.symmetric, doc_ids=doc_ids, impl=self.impl
        )
