"""The InfoNCE custom op ``biencoder::info_nce`` and the functions that run the loss
through it: :func:`chunked_info_nce` (the PyTorch path of :mod:`kernels.infonce_chunked`)
and :func:`fused_info_nce` (the Triton kernels of :mod:`kernels.infonce`, run by
:mod:`kernels.infonce_host`). The options are defined in :mod:`losses.infonce`.
"""

from __future__ import annotations

import torch

from biencoder.kernels.infonce_chunked import chunked_backward, chunked_forward
from biencoder.kernels.infonce_options import (
    InfoNCEStats,
    LossTerms,
    check_fused_backward,
    compute_dtype_of,
    validated_options,
)

# ------------------------------------------------------------------------------------------
# The loss as a custom operator, so that torch.compile sees one node with known output
# shapes (the fake) and a known backward (itself an op, so AOTAutograd traces it), instead
# of tracing into the implementations: their chunk loops would unroll into the graph for
# every shape. Both the chunked and the fused path run behind it: `fused` picks the Triton
# kernels (CUDA, or CPU under TRITON_INTERPRET=1), otherwise the chunked PyTorch code runs
# on whatever device the tensors are on. Custom ops take no dataclasses or None-valued
# strings, so LossTerms travels as six plain arguments (LossTerms.op_args), and return a
# fixed tuple of tensors, so absent outputs (the statistics without `return_stats`) are
# empty tensors.
# ------------------------------------------------------------------------------------------


def _fused_kernels():
    # Imported on first use: importing the kernels decides whether Triton interprets them.
    from biencoder.kernels import infonce_host

    return infonce_host


@torch.library.custom_op("biencoder::info_nce", mutates_args=())
def info_nce_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    directions: str,
    joint: bool,
    hardness_mode: str,
    hardness_strength: float,
    guide_margin: float,
    guide_relative: bool,
    return_stats: bool,
    fused: bool,
    deterministic: bool,
    backward: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, positive, best_other, best_other_index, false_negatives)``.

    ``scale`` is a 0-dim tensor (it may require grad); ``directions`` … ``guide_relative``
    are :meth:`LossTerms.op_args`; ``doc_owners`` is resolved (not None) when the terms
    need it; ``fused`` runs the Triton kernels with the ``backward`` strategy of
    :func:`kernels.infonce_host.infonce_backward` ("gemm" or "recompute", whose dd is
    accumulated atomically unless ``deterministic``); ``chunk_size`` is the chunked
    path's tile, and the "gemm" backward's column chunk. ``lse``
    [num_lse, B] is what the backward needs; the four statistics are empty unless
    ``return_stats``. Use :func:`losses.infonce.info_nce`, which validates the arguments
    and wraps the statistics.
    """
    terms = LossTerms.from_op_args(
        directions, joint, hardness_mode, hardness_strength, guide_margin, guide_relative
    )
    if fused:
        result = _fused_kernels().infonce_forward(
            q,
            d,
            scale,
            doc_ids,
            return_stats=return_stats,
            terms=terms,
            doc_owners=doc_owners,
            guide_q=guide_q,
            guide_d=guide_d,
        )
        loss, lse, stats = result.loss, result.lse, result.stats
        stats_tensors = (
            (stats.positive, stats.best_other, stats.best_other_index, stats.false_negatives)
            if stats is not None
            else None
        )
    else:
        loss, lse, stats_tensors = chunked_forward(
            q, d, scale, doc_ids, doc_owners, guide_q, guide_d, terms, chunk_size, return_stats
        )
    if stats_tensors is None:
        empty = lse.new_empty(0, dtype=torch.float32)
        no_rows = torch.empty(0, dtype=torch.int64, device=q.device)
        stats_tensors = (empty, empty.clone(), no_rows, no_rows.clone())
    return loss, lse, *stats_tensors


@info_nce_op.register_fake
def _info_nce_fake(
    q,
    d,
    scale,
    doc_ids,
    doc_owners,
    guide_q,
    guide_d,
    directions,
    joint,
    hardness_mode,
    hardness_strength,
    guide_margin,
    guide_relative,
    return_stats,
    fused,
    deterministic,
    backward,
    chunk_size,
):
    batch = q.shape[0]
    dtype = compute_dtype_of(q.dtype)
    num_lse = 1 if joint else len(directions.split(","))
    stats_rows = batch if return_stats else 0
    return (
        q.new_empty((), dtype=dtype),
        q.new_empty((num_lse, batch), dtype=dtype),
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
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    lse: torch.Tensor,
    directions: str,
    joint: bool,
    hardness_mode: str,
    hardness_strength: float,
    guide_margin: float,
    guide_relative: bool,
    fused: bool,
    deterministic: bool,
    backward: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of ``info_nce_op``'s loss for the upstream gradient ``grad_loss``."""
    terms = LossTerms.from_op_args(
        directions, joint, hardness_mode, hardness_strength, guide_margin, guide_relative
    )
    if fused:
        dq, dd, dscale = _fused_kernels().infonce_backward(
            q,
            d,
            scale,
            grad_loss,
            lse,
            doc_ids,
            deterministic,
            terms=terms,
            doc_owners=doc_owners,
            guide_q=guide_q,
            guide_d=guide_d,
            backward=backward,
            chunk_size=chunk_size,
        )
    else:
        dq, dd, dscale = chunked_backward(
            grad_loss, q, d, scale, doc_ids, doc_owners, guide_q, guide_d, lse, terms, chunk_size
        )
    # Contiguous like the fake outputs, whatever the strides of q and d.
    return dq.contiguous(), dd.contiguous(), dscale.to(scale.dtype).reshape(scale.shape)


@info_nce_backward_op.register_fake
def _info_nce_backward_fake(grad_loss, q, d, scale, *_rest):
    return q.new_empty(q.shape), d.new_empty(d.shape), scale.new_empty(scale.shape)


_TERM_ARGS = slice(7, 13)


def _info_nce_setup_context(ctx, inputs, output) -> None:
    q, d, scale, doc_ids, doc_owners, guide_q, guide_d = inputs[:7]
    fused, deterministic, backward, chunk_size = inputs[14:]
    _, lse, *stats_tensors = output
    ctx.mark_non_differentiable(lse, *stats_tensors)
    # The inputs and O(B) logsumexps only: the backward recomputes the logits.
    ctx.save_for_backward(q, d, scale, doc_ids, doc_owners, guide_q, guide_d, lse)
    ctx.term_args = inputs[_TERM_ARGS]
    ctx.fused, ctx.deterministic, ctx.chunk_size = fused, deterministic, chunk_size
    ctx.backward = backward


def _info_nce_backward(ctx, grad_loss, *_other_grads):
    dq, dd, dscale = info_nce_backward_op(
        grad_loss,
        *ctx.saved_tensors,
        *ctx.term_args,
        ctx.fused,
        ctx.deterministic,
        ctx.backward,
        ctx.chunk_size,
    )
    # The guides come from a frozen model: no gradient, like the ids and the options.
    return dq, dd, dscale, *([None] * 15)


info_nce_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)


def scale_as_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The scale 1/temperature as the 0-dim tensor ``info_nce_op`` takes, on ``device``; a
    tensor keeps its dtype and its gradient."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.to(device, non_blocking=True).reshape(())
    # fp64 so that the fp64 (gradcheck) path sees 1/temperature unrounded; the kernels and
    # the fp32 chunked path round it to fp32 as before. Filled on the device rather than
    # copied from the host, which on a GPU would wait for the stream.
    return torch.full((), float(scale), device=device, dtype=torch.float64)


def _run_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool,
    doc_ids: torch.Tensor | None,
    options: dict,
    return_stats: bool,
    fused: bool,
    deterministic: bool = True,
    backward: str = "gemm",
    chunk_size: int = 4096,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """``info_nce_op`` with ``options`` (:func:`losses.infonce.info_nce`'s keywords)
    validated and its outputs as the public functions return them: the loss, or
    ``(loss, InfoNCEStats)`` with ``return_stats``."""
    terms, extras = validated_options(q, d, doc_ids, symmetric, options)
    scale = scale_as_tensor(scale, q.device)
    if fused:
        # Before the forward runs, not when the backward first reads them.
        check_fused_backward(backward, chunk_size)
    loss, _, *stats_tensors = info_nce_op(
        q,
        d,
        scale,
        doc_ids,
        extras.doc_owners,
        extras.guide_q,
        extras.guide_d,
        *terms.op_args(),
        return_stats,
        fused,
        deterministic,
        backward,
        chunk_size,
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
    **options,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """InfoNCE in plain PyTorch, ``chunk_size`` × ``chunk_size`` logits at a time.

    Peak extra memory is one such tile (plus bool masks of that size with ``doc_ids`` and
    the other options) besides the inputs and their gradients; the backward recomputes each
    tile's logits once per direction and takes both gradient products from it.
    ``return_stats`` adds :class:`InfoNCEStats` from the forward's own tiles (O(B) more
    memory; loss and gradients unchanged). ``options`` are
    :func:`losses.infonce.info_nce`'s keywords.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _run_op(
        q, d, scale, symmetric, doc_ids, options, return_stats, fused=False, chunk_size=chunk_size
    )


def fused_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    deterministic: bool = True,
    return_stats: bool = False,
    backward: str = "gemm",
    chunk_size: int = 4096,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """Mean InfoNCE loss of queries ``q`` [B, D] against documents ``d`` [N, D], fused.

    ``d[i]`` is the positive of ``q[i]`` and ``d[B:]`` are hard negatives shared by all
    queries; logits are ``scale · q · dᵀ`` (scale = 1/temperature, a float or a 0-dim tensor
    that may require grad). ``symmetric`` averages in the document→query loss over the B
    positives. ``doc_ids`` [N] removes false negatives: column j != i leaves row i's softmax
    when ``doc_ids[j] == doc_ids[i]``. ``options`` are :func:`losses.infonce.info_nce`'s
    keywords (directions, partition, guide filter, hardness). ``backward="gemm"`` (the
    default) materialises p − onehot ``chunk_size`` columns at a time and takes the two
    gradient products as GEMMs; ``"recompute"`` keeps memory O(B + N) by recomputing the
    logits in the gradient kernels, where ``deterministic=False`` trades bitwise
    reproducibility of dd for one fewer recomputation (atomic adds). Returns an fp32
    scalar whatever the input dtype (fp32, fp16 or bf16); memory beyond the inputs and
    their gradients is O(B + N), plus B × chunk_size in the backward with ``"gemm"``.
    ``return_stats=True`` returns ``(loss,
    InfoNCEStats)``, the query→document ranking statistics from the same forward launch
    (detached; the loss and gradients are those without them). Runs as the custom op
    ``biencoder::info_nce``, so torch.compile traces it without a graph break.
    """
    return _run_op(
        q,
        d,
        scale,
        symmetric,
        doc_ids,
        options,
        return_stats,
        fused=True,
        deterministic=deterministic,
        backward=backward,
        chunk_size=chunk_size,
    )
