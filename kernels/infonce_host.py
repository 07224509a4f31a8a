"""The host side of the fused InfoNCE kernels: :func:`infonce_forward` and
:func:`infonce_backward` validate the inputs, launch the kernels of :mod:`kernels.infonce`
once per direction and combine the directions. :func:`kernels.infonce_op.fused_info_nce`
runs them as a differentiable loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from biencoder.kernels.infonce import INTERPRETED
from biencoder.kernels.infonce_launch import (
    BlockSizes,
    KernelInputs,
    default_blocks,
    default_forward_block_sizes,
    default_probs_block_sizes,
    launch_backward,
    launch_backward_gemm,
    launch_forward,
)
from biencoder.kernels.infonce_options import (
    PLAIN,
    InfoNCEStats,
    LossTerms,
    accumulate_direction_grads,
    check_fused_backward,
    check_inputs,
    combine_partitions,
    guide_thresholds,
    loss_terms,
    resolve_extras,
)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class InfoNCEForward:
    """Result of :func:`infonce_forward`: the mean loss, the O(B) softmax statistics ``lse``
    [num_lse, B] (the joint partition's row logsumexp, or one row per direction) and, when
    asked for, the query→document ranking statistics."""

    loss: torch.Tensor
    lse: torch.Tensor
    stats: InfoNCEStats | None = None


def _validated(
    q: torch.Tensor,
    d: torch.Tensor,
    doc_ids: torch.Tensor | None,
    terms: LossTerms = PLAIN,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
) -> KernelInputs:
    """Checks shapes, dtypes and devices; returns contiguous q, d and guides (in q's dtype),
    int64 doc ids and owners (the default owners when the terms need them), and the guide
    thresholds in fp32."""
    if q.dim() != 2 or d.dim() != 2:
        raise ValueError(f"q and d must be 2-D, got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"q and d must share the embedding dim, got {q.shape[1]} != {d.shape[1]}")
    batch, num_docs = q.shape[0], d.shape[0]
    if batch == 0 or q.shape[1] == 0:
        raise ValueError("q must have at least one row and one column")
    if num_docs < batch:
        raise ValueError(f"d needs one positive per query: N={num_docs} < B={batch}")
    if q.device != d.device:
        raise ValueError(f"q is on {q.device} but d is on {d.device}")
    if q.dtype != d.dtype:
        raise ValueError(f"q is {q.dtype} but d is {d.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported; use one of {_SUPPORTED_DTYPES}")
    if not (q.is_cuda or (INTERPRETED and q.device.type == "cpu")):
        raise RuntimeError(
            "the Triton InfoNCE kernels need CUDA tensors; for CPU tensors set "
            "TRITON_INTERPRET=1 before kernels.infonce is first imported"
        )
    if doc_ids is not None:
        if doc_ids.shape != (num_docs,):
            raise ValueError(f"doc_ids must have shape ({num_docs},), got {tuple(doc_ids.shape)}")
        if (
            doc_ids.dtype.is_floating_point
            or doc_ids.dtype.is_complex
            or (doc_ids.dtype == torch.bool)
        ):
            raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids is on {doc_ids.device} but q is on {q.device}")
        doc_ids = doc_ids.to(torch.int64).contiguous()
    check_inputs(q, d, None, doc_owners, guide_q, guide_d)
    for name, tensor in (("doc_owners", doc_owners), ("guide_q", guide_q), ("guide_d", guide_d)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    extras = resolve_extras(q, d, terms, doc_owners, guide_q, guide_d)
    owners = extras.doc_owners.contiguous() if extras.doc_owners is not None else None
    thresholds = None
    if guide_q is not None:
        guide_q = extras.guide_q.to(q.dtype).contiguous()
        guide_d = extras.guide_d.to(q.dtype).contiguous()
        thresholds = guide_thresholds(guide_q, guide_d, terms, q.dtype).float().contiguous()
    return KernelInputs(
        q.contiguous(), d.contiguous(), doc_ids, owners, guide_q, guide_d, thresholds, terms
    )


def _scale_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.detach().to(device, torch.float32, non_blocking=True).reshape(())
    # Filled on the device: a copy from the host would wait for the stream.
    return torch.full((), float(scale), device=device, dtype=torch.float32)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, not on the tensors' one: without this a
    # tensor on cuda:1 would be read by a kernel running on cuda:0.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _terms_of(symmetric: bool, terms: LossTerms | None) -> LossTerms:
    if terms is None:
        return loss_terms(symmetric)
    if symmetric:
        raise ValueError("pass either symmetric or terms")
    return terms


def infonce_forward(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    block_sizes: BlockSizes | None = None,
    return_stats: bool = False,
    *,
    terms: LossTerms | None = None,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
) -> InfoNCEForward:
    """Mean InfoNCE loss (fp32 scalar) plus the per-row logsumexps the backward needs.

    ``terms`` (:func:`kernels.infonce_options.loss_terms`; ``symmetric`` is the shorthand for its
    per-direction pair) picks the directions, partition, hardness and guide margin; one
    launch per direction. ``stats`` are the query→document ranking statistics when
    ``return_stats``, from the same launch as that direction's loss. Non-contiguous inputs
    are copied to contiguous ones.
    """
    terms = _terms_of(symmetric, terms)
    inputs = _validated(q, d, doc_ids, terms, doc_owners, guide_q, guide_d)
    scale = _scale_tensor(scale, inputs.q.device)
    with _on_device(inputs.q.device):
        launches = []
        for index, spec in enumerate(terms.specs()):
            with_stats = return_stats and index == 0
            blocks = block_sizes or default_blocks(
                inputs, spec, default_forward_block_sizes, with_stats=with_stats
            )
            launches.append(launch_forward(inputs, spec, scale, blocks, with_stats))
    lse, row_loss, stats = launches[0]
    partition = combine_partitions([launch[0] for launch in launches], terms.joint)
    if len(launches) == 1:
        loss = row_loss.mean()
    elif terms.joint:
        # loss_i = joint lse_i − positive logit_i, the latter as lse_i − loss_i of q→d.
        loss = (row_loss + (partition[0] - lse)).mean()
    else:
        loss = sum(launch[1].mean() for launch in launches) / len(launches)
    return InfoNCEForward(loss=loss, lse=partition, stats=stats)


def infonce_backward(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    grad_loss: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    deterministic: bool = True,
    block_sizes: BlockSizes | None = None,
    *,
    terms: LossTerms = PLAIN,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
    backward: str = "gemm",
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dd, dscale) of the mean loss scaled by the upstream ``grad_loss``.

    ``lse`` and ``terms`` are those of :func:`infonce_forward`. ``backward`` picks the
    strategy (see the Math comment of :mod:`kernels.infonce`): ``"gemm"`` writes
    p − onehot for ``chunk_size`` columns at a time (B × chunk_size in the input dtype)
    and multiplies it out with cuBLAS; ``"recompute"`` never stores a logit, recomputing
    them inside the gradient kernels. ``deterministic=False`` (``"recompute"`` only;
    ``"gemm"`` is deterministic) accumulates the column gradients with atomic adds from
    the row pass: one logit recomputation instead of two, but the fp32 summation order
    (hence the last bits) varies between runs on a GPU. ``block_sizes`` are the tiles of
    the chosen kernels.
    """
    check_fused_backward(backward, chunk_size)
    inputs = _validated(q, d, doc_ids, terms, doc_owners, guide_q, guide_d)
    q, d = inputs.q, inputs.d
    batch = q.shape[0]
    if lse.shape != (terms.num_lse, batch):
        raise ValueError(f"lse must be [{terms.num_lse}, {batch}], got {tuple(lse.shape)}")
    scale = _scale_tensor(scale, q.device)
    specs = terms.specs()
    per_row = 1 if terms.joint else len(specs)
    row_grad = grad_loss.detach().to(device=q.device, dtype=torch.float32) / (batch * per_row)

    totals = None
    with _on_device(q.device):
        for index, spec in enumerate(specs):
            term_lse = lse[0 if terms.joint else index].float().contiguous()
            if backward == "gemm":
                blocks = block_sizes or default_blocks(inputs, spec, default_probs_block_sizes)
                d_rows, d_cols = launch_backward_gemm(
                    inputs, spec, scale, term_lse, blocks, chunk_size
                )
            else:
                blocks = block_sizes or default_blocks(inputs, spec)
                d_rows, d_cols = launch_backward(
                    inputs, spec, scale, term_lse, deterministic, blocks
                )
            rows = spec.rows(q, d).float()
            totals = accumulate_direction_grads(totals, spec, rows, d_rows, d_cols)
    dq, dd, dscale = totals
    weight = row_grad * scale
    return (dq * weight).to(q.dtype), (dd * weight).to(d.dtype), dscale * row_grad
