"""Fused InfoNCE (in-batch negatives + shared hard negatives) as Triton kernels.

The B×N logit matrix is never materialised: the forward pass keeps only the per-row
logsumexp, the backward pass recomputes each logit tile from q and d. Memory is O(B + N)
beyond the inputs and their gradients. Every direction, partition, the guide-model filter
and the hardness weighting of :mod:`losses.infonce` run on the same kernels.

On a machine without CUDA the kernels run under Triton's interpreter on CPU tensors; set
``TRITON_INTERPRET=1`` before this module is imported (Triton reads it when the kernels are
decorated).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from biencoder.losses.infonce import (
    DIAGONAL_EXCLUDED,
    HARDNESS_CODES,
    PLAIN,
    Direction,
    InfoNCEStats,
    LossTerms,
    _resolve_extras,
    _validated_options,
    call_info_nce_op,
    check_fused_backward,
    check_inputs,
    guide_thresholds,
    loss_terms,
    scale_as_tensor,
)

# ------------------------------------------------------------------------------------------
# Math. The kernels rank B row vectors against C column vectors; in the kernels' names the
# rows are q [B, D] and the columns d [C, D]. For query→document, the plain loss, they are
# the queries and the documents (C = N >= B): d[i] is the positive of q[i] and d[B:] are
# hard negatives shared by every query. s = 1/τ.
#
#   logits_ij = s·q_i·d_j                       excluded (−inf) when j >= C, or when
#                                               j != i and doc_ids[j] == doc_ids[i]
#   loss_i    = lse_i − logits_ii,   lse_i = logsumexp_j logits_ij,   L = mean_i loss_i
#
# Forward (one program per BLOCK_M rows): walk the column tiles keeping an online softmax
# state in fp32, running max m_i and running sum l_i of exp(logits − m_i):
#   m' = max(m, max_j logits_ij);  l = l·exp(m − m') + Σ_j exp(logits_ij − m');  m = m'
# and finally lse_i = m_i + log l_i. Only lse[B] (and loss[B]) are written: O(B).
#
# Backward, with upstream gradient g = ∂L_total/∂loss_i = G/B for every row (the mean):
#   p_ij       = exp(logits_ij − lse_i)          (recomputed per tile, 0 where excluded)
#   dlogits_ij = g·(p_ij − [i == j])
#   ∂/∂q_i     = s·Σ_j dlogits_ij·d_j            (_infonce_bwd_dq_kernel, rows own dq)
#   ∂/∂d_j     = s·Σ_i dlogits_ij·q_i            (_infonce_bwd_dd_kernel, columns own dd;
#                                               or, with deterministic=False, atomic adds
#                                               from the dq kernel: one recomputation of
#                                               the logits instead of two)
#   ∂/∂s       = Σ_ij dlogits_ij·(q_i·d_j) = Σ_ij dlogits_ij·logits_ij / s
#              = Σ_i q_i·(Σ_j dlogits_ij·d_j)
# The last form is the dq accumulator before its factor s, so the kernels write the
# unscaled accumulators in fp32 and the host gets ∂/∂s from an O(B·D) dot product instead
# of a third reduction over the B×N tiles. Because g is the same for every row, the kernels
# leave it out too: they accumulate (p − onehot)·d and (p − onehot)ᵀ·q, and the host
# multiplies by g·s. Applied inside the tile, g = G/B would push each negative's
# g·p_ij below fp16's smallest subnormal at large B (3e-9 at B=16k, τ=0.05), and the cast
# to fp16 before the tile product would zero every negative's gradient.
#
# Directions. Each is this problem with other rows, columns and exclusions (the host
# launches one per direction, see losses.infonce.Direction):
#   query→document   q vs d       diagonal = the positive (the onehot target)
#   query→query      q vs q       diagonal excluded (DIAGONAL=2)
#   document→query   d[:B] vs q   diagonal = the positive: the target per direction, kept
#                                 without a target in a joint partition (DIAGONAL=1)
#   document→doc     d[:B] vs d   diagonal and the docs mined by row i excluded
#                                 (EXCLUDE_OWN: j >= B and owners[j] == i)
# doc_ids apply unchanged: row i carries doc_ids[i] and column j doc_ids[j] (a query column
# j < B the id of its positive). A joint partition's lse_i is the logaddexp of the
# directions' row lse (host, O(B)); every direction's backward is the recomputation above
# with p_ij = exp(logits_ij − joint lse_i) and the onehot only where DIAGONAL=0. Per
# direction, each uses its own lse and g is divided by the number of directions.
#
# Guide filter (HAS_GUIDE): with guide rows/columns gq [B, G], gd [C, G] of the same texts
# and the host's O(B) thresholds t_i (the guide's positive score minus the margin), a tile
# also computes h_ij = gq_i·gd_j (fp32 accumulation, a second K loop over G) and excludes
# h_ij > t_i, except on a diagonal that is the positive pair. No B×N guide matrix exists.
#
# Hardness (HARDNESS = 1 in-batch, 2 own hard negatives, 3 all negatives; query→document
# only): logits_ij += α·r_ij on the selected columns, r_ij = q_i·d_j. It is a stop-gradient:
# the backward's p uses the penalised logits, while ∂logits/∂q = s·d, ∂logits/∂s = r as
# before, so nothing else changes.
#
# Ranking statistics (forward with WITH_STATS, launched for the q→d direction only), taken
# from the same tiles in the same pass, on the unscaled products r_ij = q_i·d_j:
#   positive_i = r_ii
#   O_i        = {j < N : j != i, j not excluded}          (the competitors of row i)
#   best_i     = max_{j ∈ O_i} r_ij,   index_i = the first such j;   −inf, −1 if O_i = ∅
#   fn_i       = |{j < N : j != i, doc_ids[j] == doc_ids[i]}|
# best/index fold over the column tiles like the running max, but a tile replaces them only
# when its maximum is strictly larger: ties keep the first column and rows whose every
# tile is excluded keep −1. r rather than s·r, so the values are the similarities users
# read and their order is that of q·d whatever s is. Four more O(B) outputs, nothing saved.
#
# Two backward strategies (``backward=``):
#   "recompute"  the kernels above: O(B + N) memory, but each logit tile is recomputed by
#                the dq kernel once per BLOCK_DOUT slice of D and again by the dd kernel
#                (with deterministic=True): 2·BND for the forward's logits becomes up to
#                ~18·BND executed at D=768, in small tiles.
#   "gemm"       column chunks of C documents: _infonce_bwd_probs_kernel recomputes each
#                logit tile of the chunk once and writes P = p − onehot [B, C] in the
#                input dtype; the two products dq += P·d_C and dd_C = Pᵀ·q run as
#                tensor-core GEMMs (cuBLAS) with fp32 output. 8·BND in all and O(B·C)
#                memory, bounded by the chunk; deterministic, since nothing is atomic.
# Both compute the same unscaled accumulators, so the host's g·s and ∂/∂s are shared.
#
# Every tile product accumulates in fp32 whatever the input dtype; p − onehot is cast to
# the input dtype before the backward products, as FlashAttention does with P, so
# fp16/bf16 use tensor cores. The new features are constexpr flags: with them off (one
# direction, no guide, no hardness) the kernels compile to the plain loss's code.
# ------------------------------------------------------------------------------------------

# Finite stand-in for −inf as the initial running max: a row whose first column tiles are
# all excluded then gives exp(−inf − (−1e30)) = 0 instead of exp(−inf + inf) = nan.
_RUNNING_MAX_INIT = tl.constexpr(-1e30)
# losses.infonce.DIAGONAL_EXCLUDED and HARDNESS_CODES, as constexprs the kernels can read.
_DIAGONAL_EXCLUDED = tl.constexpr(DIAGONAL_EXCLUDED)
_HARDNESS_OWN = tl.constexpr(HARDNESS_CODES["hard_negatives"])
_HARDNESS_ALL = tl.constexpr(HARDNESS_CODES["all_negatives"])


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 storage. Products
    # of bf16 values are exact in fp32, so upcasting first yields the same products that
    # bf16 tensor cores accumulate in fp32.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _raw_dot_tile(
    q_ptr,
    d_ptr,
    rows,
    cols,
    B,
    N,
    D,
    stride_q,
    stride_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """q[rows]·d[cols]ᵀ in fp32, looping over D in BLOCK_D slices (zeros outside B, N, D)."""
    # int64 so that row·stride cannot overflow for B, N up to 65,536 and D up to 4096.
    q_row_offsets = rows.to(tl.int64)[:, None] * stride_q
    d_row_offsets = cols.to(tl.int64)[:, None] * stride_d
    row_in = rows[:, None] < B
    col_in = cols[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, D, BLOCK_D):
        ks = k_start + tl.arange(0, BLOCK_D)
        k_in = ks[None, :] < D
        q_tile = tl.load(q_ptr + q_row_offsets + ks[None, :], mask=row_in & k_in, other=0.0)
        d_tile = tl.load(d_ptr + d_row_offsets + ks[None, :], mask=col_in & k_in, other=0.0)
        acc = _dot(q_tile, tl.trans(d_tile), acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS: tl.constexpr):
    # One return of one dtype: Triton's code generator (unlike the interpreter) rejects a
    # function whose returns differ in type, and an early return inside the constexpr `if`
    # counts as a second return.
    if HAS_DOC_IDS:
        row_doc_ids = tl.load(doc_ids_ptr + rows, mask=rows < B, other=-1)
    else:
        # Without doc ids the value is never read; Triton needs a tensor either way.
        row_doc_ids = rows.to(tl.int64)
    return row_doc_ids


@triton.jit
def _load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE: tl.constexpr):
    # As _load_row_doc_ids: one return, a placeholder tensor without the guide.
    if HAS_GUIDE:
        thresholds = tl.load(threshold_ptr + rows, mask=rows < B, other=0.0)
    else:
        thresholds = tl.zeros(rows.shape, dtype=tl.float32)
    return thresholds


@triton.jit
def _excluded_columns(
    doc_ids_ptr,
    rows,
    cols,
    row_doc_ids,
    N,
    HAS_DOC_IDS: tl.constexpr,
):
    """Mask of logits that leave the logsumexp: padding columns and false negatives."""
    excluded = cols[None, :] >= N
    if HAS_DOC_IDS:
        col_doc_ids = tl.load(doc_ids_ptr + cols, mask=cols < N, other=-1)
        same_doc = row_doc_ids[:, None] == col_doc_ids[None, :]
        excluded = excluded | (same_doc & (rows[:, None] != cols[None, :]))
    return excluded


@triton.jit
def _mined_by_row(owners_ptr, rows, cols, B, N):
    """Mask of the hard negatives (columns j >= B) that row i mined: owners[j] == i."""
    owners = tl.load(owners_ptr + cols, mask=cols < N, other=-1)
    return (cols[None, :] >= B) & (owners[None, :] == rows[:, None])


@triton.jit
def _direction_exclusions(
    excluded,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    rows,
    cols,
    row_thresholds,
    B,
    N,
    G,
    stride_guide_q,
    stride_guide_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``excluded`` plus the direction's own exclusions: the diagonal (DIAGONAL=2), the
    documents row i mined (EXCLUDE_OWN) and the columns the guide scores above t_i."""
    diagonal = rows[:, None] == cols[None, :]
    if DIAGONAL == _DIAGONAL_EXCLUDED:
        excluded = excluded | diagonal
    if EXCLUDE_OWN:
        excluded = excluded | _mined_by_row(owners_ptr, rows, cols, B, N)
    if HAS_GUIDE:
        guide_scores = _raw_dot_tile(
            guide_q_ptr,
            guide_d_ptr,
            rows,
            cols,
            B,
            N,
            G,
            stride_guide_q,
            stride_guide_d,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            INPUT_PRECISION,
            UPCAST_DOT,
        )
        dropped = guide_scores > row_thresholds[:, None]
        if DIAGONAL != _DIAGONAL_EXCLUDED:
            # The positive pair is never the guide's to drop.
            dropped = dropped & ~diagonal
        excluded = excluded | dropped
    return excluded


@triton.jit
def _with_hardness(
    logits, raw, owners_ptr, rows, cols, B, N, hardness_strength, HARDNESS: tl.constexpr
):
    """logits + α·r on the columns HARDNESS selects (a stop-gradient term; see the Math)."""
    if HARDNESS != 0:
        not_positive = rows[:, None] != cols[None, :]
        if HARDNESS == _HARDNESS_ALL:
            selected = not_positive
        else:
            mined = _mined_by_row(owners_ptr, rows, cols, B, N)
            selected = mined if HARDNESS == _HARDNESS_OWN else not_positive & ~mined
        logits = logits + tl.where(selected, hardness_strength * raw, 0.0)
    return logits


@triton.jit
def _unweighted_dlogits_tile(
    q_ptr,
    d_ptr,
    doc_ids_ptr,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    rows,
    cols,
    row_lse,
    row_doc_ids,
    row_thresholds,
    scale,
    hardness_strength,
    B,
    N,
    D,
    G,
    stride_q,
    stride_d,
    stride_guide_q,
    stride_guide_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DOC_IDS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HARDNESS: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """dlogits / g = softmax − onehot for one tile, recomputed from q and d; 0 outside the
    problem. The onehot is on the diagonal only when it is the target (DIAGONAL=0)."""
    raw = _raw_dot_tile(
        q_ptr,
        d_ptr,
        rows,
        cols,
        B,
        N,
        D,
        stride_q,
        stride_d,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        INPUT_PRECISION,
        UPCAST_DOT,
    )
    excluded = _excluded_columns(doc_ids_ptr, rows, cols, row_doc_ids, N, HAS_DOC_IDS)
    excluded = _direction_exclusions(
        excluded,
        owners_ptr,
        guide_q_ptr,
        guide_d_ptr,
        rows,
        cols,
        row_thresholds,
        B,
        N,
        G,
        stride_guide_q,
        stride_guide_d,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DIAGONAL,
        EXCLUDE_OWN,
        HAS_GUIDE,
        INPUT_PRECISION,
        UPCAST_DOT,
    )
    # Padding rows have lse 0, where exp(logits) may overflow; they must contribute exactly 0.
    excluded = excluded | (rows[:, None] >= B)
    logits = _with_hardness(
        raw * scale, raw, owners_ptr, rows, cols, B, N, hardness_strength, HARDNESS
    )
    probs = tl.where(excluded, 0.0, tl.exp(logits - row_lse[:, None]))
    if DIAGONAL == 0:
        is_positive = (rows[:, None] == cols[None, :]) & (rows[:, None] < B)
        probs = probs - is_positive.to(tl.float32)
    return probs


@triton.jit
def _infonce_fwd_kernel(
    q_ptr,
    d_ptr,
    doc_ids_ptr,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    threshold_ptr,
    scale_ptr,
    lse_ptr,
    loss_ptr,
    positive_ptr,
    best_other_ptr,
    best_other_index_ptr,
    false_negatives_ptr,
    B,
    N,
    D,
    G,
    hardness_strength,
    stride_q,
    stride_d,
    stride_guide_q,
    stride_guide_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DOC_IDS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HARDNESS: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    WITH_STATS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Per-row lse and loss (lse − the diagonal logit); with WITH_STATS also the four
    ranking statistics.

    Pointers of switched-off features (statistics without WITH_STATS, owners without
    EXCLUDE_OWN or an owner-based HARDNESS, guides and thresholds without HAS_GUIDE) are
    placeholders and never touched.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < B
    # The scale is read on the device so that a learnable temperature needs no host sync.
    scale = tl.load(scale_ptr).to(tl.float32)
    row_doc_ids = _load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = _load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)

    running_max = tl.full((BLOCK_M,), _RUNNING_MAX_INIT, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best_other = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_other_index = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    false_negatives = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        raw = _raw_dot_tile(
            q_ptr,
            d_ptr,
            rows,
            cols,
            B,
            N,
            D,
            stride_q,
            stride_d,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            INPUT_PRECISION,
            UPCAST_DOT,
        )
        logits = scale * raw
        is_positive = rows[:, None] == cols[None, :]
        positive_logit += tl.sum(tl.where(is_positive, logits, 0.0), axis=1)
        doc_id_excluded = _excluded_columns(doc_ids_ptr, rows, cols, row_doc_ids, N, HAS_DOC_IDS)
        excluded = _direction_exclusions(
            doc_id_excluded,
            owners_ptr,
            guide_q_ptr,
            guide_d_ptr,
            rows,
            cols,
            row_thresholds,
            B,
            N,
            G,
            stride_guide_q,
            stride_guide_d,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            DIAGONAL,
            EXCLUDE_OWN,
            HAS_GUIDE,
            INPUT_PRECISION,
            UPCAST_DOT,
        )
        if WITH_STATS:
            positive += tl.sum(tl.where(is_positive, raw, 0.0), axis=1)
            others = tl.where(excluded | is_positive, float("-inf"), raw)
            tile_best, tile_best_index = tl.max(
                others, axis=1, return_indices=True, return_indices_tie_break_left=True
            )
            improved = tile_best > best_other
            best_other = tl.where(improved, tile_best, best_other)
            best_other_index = tl.where(improved, col_start + tile_best_index, best_other_index)
            if HAS_DOC_IDS:
                # Counted from the doc ids alone: the padding columns j >= N are not
                # documents, and the guide's drops are not false negatives by text.
                false_negative = doc_id_excluded & (cols[None, :] < N)
                false_negatives += tl.sum(false_negative.to(tl.int32), axis=1)
        logits = _with_hardness(
            logits, raw, owners_ptr, rows, cols, B, N, hardness_strength, HARDNESS
        )
        logits = tl.where(excluded, float("-inf"), logits)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max

    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_in)
    tl.store(loss_ptr + rows, lse - positive_logit, mask=row_in)
    if WITH_STATS:
        tl.store(positive_ptr + rows, positive, mask=row_in)
        tl.store(best_other_ptr + rows, best_other, mask=row_in)
        tl.store(best_other_index_ptr + rows, best_other_index.to(tl.int64), mask=row_in)
        tl.store(false_negatives_ptr + rows, false_negatives.to(tl.int64), mask=row_in)


@triton.jit
def _infonce_bwd_dq_kernel(
    q_ptr,
    d_ptr,
    doc_ids_ptr,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    threshold_ptr,
    scale_ptr,
    lse_ptr,
    dq_ptr,
    dd_ptr,
    B,
    N,
    D,
    G,
    hardness_strength,
    stride_q,
    stride_d,
    stride_guide_q,
    stride_guide_d,
    stride_dq,
    stride_dd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    HAS_DOC_IDS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HARDNESS: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    ATOMIC_DD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """dq_unscaled[rows, k-slice] = Σ_j (p − onehot)·d; with ATOMIC_DD also adds
    (p − onehot)ᵀ·q to dd.

    The second grid axis splits D into BLOCK_DOUT slices: an fp32 [BLOCK_M, D] accumulator
    would not fit in registers for large D, and for D <= BLOCK_DOUT there is a single slice
    and no logit is recomputed twice.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    row_in = rows < B
    k_in = ks < D
    scale = tl.load(scale_ptr).to(tl.float32)
    row_lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    row_doc_ids = _load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = _load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
    q_out = tl.load(
        q_ptr + rows.to(tl.int64)[:, None] * stride_q + ks[None, :],
        mask=row_in[:, None] & k_in[None, :],
        other=0.0,
    )

    dq_acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_in = cols < N
        dlogits = _unweighted_dlogits_tile(
            q_ptr,
            d_ptr,
            doc_ids_ptr,
            owners_ptr,
            guide_q_ptr,
            guide_d_ptr,
            rows,
            cols,
            row_lse,
            row_doc_ids,
            row_thresholds,
            scale,
            hardness_strength,
            B,
            N,
            D,
            G,
            stride_q,
            stride_d,
            stride_guide_q,
            stride_guide_d,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            HAS_DOC_IDS,
            DIAGONAL,
            EXCLUDE_OWN,
            HARDNESS,
            HAS_GUIDE,
            INPUT_PRECISION,
            UPCAST_DOT,
        )
        d_out = tl.load(
            d_ptr + cols.to(tl.int64)[:, None] * stride_d + ks[None, :],
            mask=col_in[:, None] & k_in[None, :],
            other=0.0,
        )
        dq_acc = _dot(dlogits.to(d_out.dtype), d_out, dq_acc, INPUT_PRECISION, UPCAST_DOT)
        if ATOMIC_DD:
            dd_part = _dot(
                tl.trans(dlogits).to(q_out.dtype),
                q_out,
                tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32),
                INPUT_PRECISION,
                UPCAST_DOT,
            )
            # Additions commute and nothing reads dd before the kernel ends: no ordering
            # is needed, and the default acq_rel adds a fence to every atomic.
            tl.atomic_add(
                dd_ptr + cols.to(tl.int64)[:, None] * stride_dd + ks[None, :],
                dd_part,
                mask=col_in[:, None] & k_in[None, :],
                sem="relaxed",
            )

    tl.store(
        dq_ptr + rows.to(tl.int64)[:, None] * stride_dq + ks[None, :],
        dq_acc,
        mask=row_in[:, None] & k_in[None, :],
    )


@triton.jit
def _infonce_bwd_dd_kernel(
    q_ptr,
    d_ptr,
    doc_ids_ptr,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    threshold_ptr,
    scale_ptr,
    lse_ptr,
    dd_ptr,
    B,
    N,
    D,
    G,
    hardness_strength,
    stride_q,
    stride_d,
    stride_guide_q,
    stride_guide_d,
    stride_dd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    HAS_DOC_IDS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HARDNESS: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """dd_unscaled[cols, k-slice] = Σ_i (p − onehot)ᵀ·q, each column tile owned by one
    program.

    Owning the column tile (instead of atomically adding into it from the row programs)
    fixes the summation order, so the result is bitwise reproducible.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    col_in = cols < N
    k_in = ks < D
    scale = tl.load(scale_ptr).to(tl.float32)

    dd_acc = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    for row_start in range(0, B, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_in = rows < B
        row_lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
        row_doc_ids = _load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
        row_thresholds = _load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
        dlogits = _unweighted_dlogits_tile(
            q_ptr,
            d_ptr,
            doc_ids_ptr,
            owners_ptr,
            guide_q_ptr,
            guide_d_ptr,
            rows,
            cols,
            row_lse,
            row_doc_ids,
            row_thresholds,
            scale,
            hardness_strength,
            B,
            N,
            D,
            G,
            stride_q,
            stride_d,
            stride_guide_q,
            stride_guide_d,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            HAS_DOC_IDS,
            DIAGONAL,
            EXCLUDE_OWN,
            HARDNESS,
            HAS_GUIDE,
            INPUT_PRECISION,
            UPCAST_DOT,
        )
        q_out = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * stride_q + ks[None, :],
            mask=row_in[:, None] & k_in[None, :],
            other=0.0,
        )
        dd_acc = _dot(tl.trans(dlogits).to(q_out.dtype), q_out, dd_acc, INPUT_PRECISION, UPCAST_DOT)

    tl.store(
        dd_ptr + cols.to(tl.int64)[:, None] * stride_dd + ks[None, :],
        dd_acc,
        mask=col_in[:, None] & k_in[None, :],
    )


@triton.jit
def _infonce_bwd_probs_kernel(
    q_ptr,
    d_ptr,
    doc_ids_ptr,
    owners_ptr,
    guide_q_ptr,
    guide_d_ptr,
    threshold_ptr,
    scale_ptr,
    lse_ptr,
    probs_ptr,
    B,
    N,
    D,
    G,
    col_start,
    chunk_cols,
    hardness_strength,
    stride_q,
    stride_d,
    stride_guide_q,
    stride_guide_d,
    stride_probs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DOC_IDS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    HARDNESS: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """probs[rows, j − col_start] = (p − onehot)[rows, j] for the chunk's columns
    j ∈ [col_start, col_start + chunk_cols), in probs' dtype: the backward's left factor,
    each logit tile recomputed once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + local
    row_in = rows < B
    scale = tl.load(scale_ptr).to(tl.float32)
    row_lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    row_doc_ids = _load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = _load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
    dlogits = _unweighted_dlogits_tile(
        q_ptr,
        d_ptr,
        doc_ids_ptr,
        owners_ptr,
        guide_q_ptr,
        guide_d_ptr,
        rows,
        cols,
        row_lse,
        row_doc_ids,
        row_thresholds,
        scale,
        hardness_strength,
        B,
        N,
        D,
        G,
        stride_q,
        stride_d,
        stride_guide_q,
        stride_guide_d,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        HAS_DOC_IDS,
        DIAGONAL,
        EXCLUDE_OWN,
        HARDNESS,
        HAS_GUIDE,
        INPUT_PRECISION,
        UPCAST_DOT,
    )
    tl.store(
        probs_ptr + rows.to(tl.int64)[:, None] * stride_probs + local[None, :],
        dlogits.to(probs_ptr.dtype.element_ty),
        mask=row_in[:, None] & (local < chunk_cols)[None, :],
    )


# ------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------

# Decided when the kernels above were decorated, so it must be read at import, not per call.
_INTERPRETED = knobs.runtime.interpret
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockSizes:
    """Tile shape of the kernels; powers of two >= 16, the smallest tile tl.dot accepts.

    ``m`` rows of q and ``n`` rows of d per tile, ``d`` the embedding slice of one logit
    product, ``d_out`` the embedding slice of one gradient accumulator; ``num_warps`` and
    ``num_stages`` (the software pipeline depth of the loops) are Triton's launch options.
    """

    m: int
    n: int
    d: int
    d_out: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("m", "n", "d", "d_out"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"block size {name}={value} must be a power of two >= 16")


# Tiles of the "recompute" backward kernels for Hopper (sm_90) at the usual embedding dims,
# keyed on (D, dtype); also the forward's where the measured table below does not apply.
# Compile-checked, and correct on an H200, but only timed as they are: 34.8 ms for the
# backward at B = N = 16,384, D = 768, bf16, against 2.8 ms for the "gemm" backward
# (bench/results/gpu_h200.md), which is why that one is the default.
# `python -m kernels.compile_check` (and tests/test_kernel_compile.py) shows every kernel
# variant compiling with these for sm_90 without register spills, within the 227 KiB of
# shared memory, and with wgmma for fp16/bf16 and TF32. With the 256-dim gradient slice or
# 64-wide K steps, or at 128×128, the dq accumulators spilled; 128×64 with 32-wide K steps
# and 128-dim slices is the largest that did not.
# fp32 keeps the 64×64 tiles: with TF32 they compile spill-free; without TF32 (FMA only,
# no tensor cores) two forward variants spill 4–16 bytes and the atomic-dd backward spills
# 2–3 KB with every tile shape tried.
_HALF_TILES = BlockSizes(m=128, n=64, d=32, d_out=128, num_warps=8, num_stages=3)
_FP32_TILES = BlockSizes(m=64, n=64, d=32, d_out=128, num_warps=8, num_stages=3)
_HOPPER_BLOCK_SIZES: dict[tuple[int, torch.dtype], BlockSizes] = {
    (dim, dtype): tiles
    for dim in (384, 768)
    for dtype, tiles in (
        (torch.float16, _HALF_TILES),
        (torch.bfloat16, _HALF_TILES),
        (torch.float32, _FP32_TILES),
    )
}


def default_block_sizes(dim: int, dtype: torch.dtype, extra_state: bool = False) -> BlockSizes:
    """Tile shape for embedding dimension ``dim`` and input ``dtype``; ``extra_state`` for
    a launch with the guide filter or the hardness term.

    D = 384 and 768 take the compile-checked Hopper table above. Other dims get one
    gradient slice up to 128 (fp32) or 256 (fp16/bf16) dims, so that each logit tile is
    recomputed at most a few times while the fp32 accumulators still fit in registers.
    """
    padded_dim = max(16, triton.next_power_of_2(dim))
    if _INTERPRETED:
        # The interpreter pays per tile operation in Python; 32-row tiles keep it quick while
        # the tests' small odd shapes still span several tiles.
        return BlockSizes(m=32, n=32, d=min(padded_dim, 128), d_out=min(padded_dim, 128))
    if (dim, dtype) in _HOPPER_BLOCK_SIZES:
        # The guide's score tile (a second fp32 accumulator) and the hardness selection
        # need registers: at 128 rows some of their fp16/bf16 variants spilled on sm_90, at
        # 64 rows none did.
        return _FP32_TILES if extra_state else _HOPPER_BLOCK_SIZES[dim, dtype]
    half = dtype in (torch.float16, torch.bfloat16)
    d_out = min(padded_dim, 256 if half else 128)
    return BlockSizes(
        m=64, n=64, d=64 if half else 32, d_out=d_out, num_warps=8 if d_out >= 128 else 4
    )


# The forward's tiles, measured on an H200 (bench/results/gpu_h200.md: bench/infonce_tiles.py
# at B = N = 16,384, D = 768, bf16, doc ids). Without the ranking statistics 64×128 with
# 64-wide K steps and 4 warps took 1.34 ms against 3.04 ms for the 128×64×32 tile the
# recompute kernels use (0.44×), the fastest of eight shapes. With them it tied with
# 64×64×64 in 4 stages (2.44 ms against 3.49), but spills 640 bytes on sm_90 (Triton
# 3.9's ptxas here) where the latter spills 16.
_HALF_FORWARD_TILES = BlockSizes(m=64, n=128, d=64, d_out=128, num_warps=4, num_stages=3)
_HALF_FORWARD_STATS_TILES = BlockSizes(m=64, n=64, d=64, d_out=128, num_warps=4, num_stages=4)


def default_forward_block_sizes(
    dim: int, dtype: torch.dtype, extra_state: bool = False, with_stats: bool = False
) -> BlockSizes:
    """Tile shape of the forward kernel (``d_out`` unused), with or without the ranking
    statistics: the measured Hopper tiles for fp16/bf16 at D = 384 and 768 without the
    guide or hardness state, otherwise :func:`default_block_sizes`."""
    half = dtype in (torch.float16, torch.bfloat16)
    if not _INTERPRETED and half and not extra_state and (dim, dtype) in _HOPPER_BLOCK_SIZES:
        return _HALF_FORWARD_STATS_TILES if with_stats else _HALF_FORWARD_TILES
    return default_block_sizes(dim, dtype, extra_state)


def default_probs_block_sizes(
    dim: int, dtype: torch.dtype, extra_state: bool = False
) -> BlockSizes:
    """Tile shape of the "gemm" backward's probability kernel (``d_out`` unused).

    It keeps no running state and no gradient accumulator, only one fp32 logit tile, so
    fp16/bf16 take 128×128 tiles with 64-wide K steps (wgmma m64n128k16 on Hopper); the
    guide's second score tile and the hardness selection take the smaller fp32 tiles.
    """
    if _INTERPRETED:
        return default_block_sizes(dim, dtype, extra_state)
    if dtype in (torch.float16, torch.bfloat16) and not extra_state:
        return BlockSizes(m=128, n=128, d=64, d_out=16, num_warps=8, num_stages=3)
    return BlockSizes(m=64, n=64, d=32, d_out=16, num_warps=4, num_stages=3)


@dataclass(frozen=True)
class InfoNCEForward:
    """Result of :func:`infonce_forward`: the mean loss, the O(B) softmax statistics ``lse``
    [num_lse, B] (the joint partition's row logsumexp, or one row per direction) and, when
    asked for, the query→document ranking statistics."""

    loss: torch.Tensor
    lse: torch.Tensor
    stats: InfoNCEStats | None = None


@dataclass(frozen=True)
class _Inputs:
    """Validated, contiguous inputs of one loss: what the launches of its directions read."""

    q: torch.Tensor
    d: torch.Tensor
    doc_ids: torch.Tensor | None
    owners: torch.Tensor | None
    guide_q: torch.Tensor | None
    guide_d: torch.Tensor | None
    thresholds: torch.Tensor | None
    terms: LossTerms


def _validated(
    q: torch.Tensor,
    d: torch.Tensor,
    doc_ids: torch.Tensor | None,
    terms: LossTerms = PLAIN,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
) -> _Inputs:
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
    if not (q.is_cuda or (_INTERPRETED and q.device.type == "cpu")):
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
    extras = _resolve_extras(q, d, terms, doc_owners, guide_q, guide_d)
    owners = extras.doc_owners.contiguous() if extras.doc_owners is not None else None
    thresholds = None
    if guide_q is not None:
        guide_q = extras.guide_q.to(q.dtype).contiguous()
        guide_d = extras.guide_d.to(q.dtype).contiguous()
        thresholds = guide_thresholds(guide_q, guide_d, terms, q.dtype).float().contiguous()
    return _Inputs(
        q.contiguous(), d.contiguous(), doc_ids, owners, guide_q, guide_d, thresholds, terms
    )


def _scale_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(scale), device=device, dtype=torch.float32)


def _matmul_allows_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    # The fp32_precision API (torch >= 2.9) reflects the legacy flag too, while reading the
    # legacy allow_tf32 raises once TF32 was set through fp32_precision.
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def _kernel_flags(dtype: torch.dtype) -> dict[str, object]:
    # fp32 inputs follow torch's own matmul setting, so the fused loss matches a plain
    # `q @ d.T` reference unless the user opted into TF32 there too.
    allow_tf32 = _matmul_allows_tf32()
    return {
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32",
        "UPCAST_DOT": _INTERPRETED and dtype == torch.bfloat16,
    }


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, not on the tensors' one: without this a
    # tensor on cuda:1 would be read by a kernel running on cuda:0.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _direction_args(inputs: _Inputs, spec: Direction, placeholder: torch.Tensor):
    """(rows, cols, pointer args, scalar args, stride args, constexprs) of one direction's
    launch; pointers of switched-off features are ``placeholder``."""
    rows, cols = spec.rows(inputs.q, inputs.d), spec.cols(inputs.q, inputs.d)
    has_guide = inputs.guide_q is not None
    if has_guide:
        guide_rows = spec.rows(inputs.guide_q, inputs.guide_d)
        guide_cols = spec.cols(inputs.guide_q, inputs.guide_d)
    else:
        guide_rows = guide_cols = placeholder
    pointers = (
        inputs.doc_ids if inputs.doc_ids is not None else placeholder,
        inputs.owners if spec.uses_owners else placeholder,
        guide_rows,
        guide_cols,
        inputs.thresholds if has_guide else placeholder,
    )
    guide_dim = inputs.guide_q.shape[1] if has_guide else 0
    hardness_strength = inputs.terms.hardness_strength if spec.hardness else 0.0
    strides = (rows.stride(0), cols.stride(0), guide_rows.stride(0), guide_cols.stride(0))
    constexprs = {
        "HAS_DOC_IDS": inputs.doc_ids is not None,
        "DIAGONAL": spec.diagonal,
        "EXCLUDE_OWN": spec.exclude_own,
        "HARDNESS": spec.hardness,
        "HAS_GUIDE": has_guide,
    }
    return rows, cols, pointers, (guide_dim, hardness_strength), strides, constexprs


def _launch_forward(
    inputs: _Inputs,
    spec: Direction,
    scale: torch.Tensor,
    blocks: BlockSizes,
    with_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, InfoNCEStats | None]:
    """One direction: per-row (lse, lse − diagonal logit) in fp32, and the ranking
    statistics of that direction when ``with_stats``."""
    batch, dim = inputs.q.shape
    lse = torch.empty(batch, device=inputs.q.device, dtype=torch.float32)
    row_loss = torch.empty_like(lse)
    rows, cols, pointers, scalars, strides, constexprs = _direction_args(inputs, spec, lse)
    num_cols = cols.shape[0]
    stats = None
    if with_stats:
        stats = InfoNCEStats(
            positive=torch.empty_like(lse),
            best_other=torch.empty_like(lse),
            best_other_index=torch.empty(batch, device=lse.device, dtype=torch.int64),
            # Zeros: without doc ids the kernel leaves the counts alone.
            false_negatives=torch.zeros(batch, device=lse.device, dtype=torch.int64),
            num_docs=num_cols,
        )
    # Pointers the kernel never dereferences (statistics without WITH_STATS) still need a
    # tensor on the right device.
    stats_outputs = (
        (stats.positive, stats.best_other, stats.best_other_index, stats.false_negatives)
        if stats is not None
        else (lse,) * 4
    )
    grid = (triton.cdiv(batch, blocks.m),)
    _infonce_fwd_kernel[grid](
        rows,
        cols,
        *pointers,
        scale,
        lse,
        row_loss,
        *stats_outputs,
        batch,
        num_cols,
        dim,
        *scalars,
        *strides,
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_D=blocks.d,
        **constexprs,
        WITH_STATS=with_stats,
        **_kernel_flags(rows.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return lse, row_loss, stats


def _launch_backward(
    inputs: _Inputs,
    spec: Direction,
    scale: torch.Tensor,
    lse: torch.Tensor,
    deterministic: bool,
    blocks: BlockSizes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction: fp32 (Σ_j (p − onehot)·cols, Σ_i (p − onehot)ᵀ·rows), i.e. the
    gradients of its rows and columns over s·g (scale times the uniform upstream weight)."""
    batch, dim = inputs.q.shape
    rows, cols, pointers, scalars, strides, constexprs = _direction_args(inputs, spec, lse)
    num_cols = cols.shape[0]
    d_rows = torch.empty(batch, dim, device=rows.device, dtype=torch.float32)
    d_cols = (torch.empty if deterministic else torch.zeros)(
        num_cols, dim, device=rows.device, dtype=torch.float32
    )
    flags = _kernel_flags(rows.dtype)
    k_slices = triton.cdiv(dim, blocks.d_out)
    _infonce_bwd_dq_kernel[(triton.cdiv(batch, blocks.m), k_slices)](
        rows,
        cols,
        *pointers,
        scale,
        lse,
        d_rows,
        d_cols,
        batch,
        num_cols,
        dim,
        *scalars,
        *strides,
        d_rows.stride(0),
        d_cols.stride(0),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_D=blocks.d,
        BLOCK_DOUT=blocks.d_out,
        **constexprs,
        ATOMIC_DD=not deterministic,
        **flags,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    if deterministic:
        _infonce_bwd_dd_kernel[(triton.cdiv(num_cols, blocks.n), k_slices)](
            rows,
            cols,
            *pointers,
            scale,
            lse,
            d_cols,
            batch,
            num_cols,
            dim,
            *scalars,
            *strides,
            d_cols.stride(0),
            BLOCK_M=blocks.m,
            BLOCK_N=blocks.n,
            BLOCK_D=blocks.d,
            BLOCK_DOUT=blocks.d_out,
            **constexprs,
            **flags,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )
    return d_rows, d_cols


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. fp16/bf16 operands stay on the tensor cores on CUDA, with cuBLAS'
    fp32 accumulator written out unrounded (``out_dtype``), so that the sum over column
    chunks is not rounded to the input dtype at every chunk."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _launch_backward_gemm(
    inputs: _Inputs,
    spec: Direction,
    scale: torch.Tensor,
    lse: torch.Tensor,
    blocks: BlockSizes,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction, as :func:`_launch_backward` returns it, by column chunks: the
    probability kernel writes P = p − onehot [B, chunk] once per chunk, and two GEMMs
    take dq += P·cols and dd_chunk = Pᵀ·rows (see the Math comment)."""
    batch, dim = inputs.q.shape
    rows, cols, pointers, scalars, strides, constexprs = _direction_args(inputs, spec, lse)
    num_cols = cols.shape[0]
    chunk = min(chunk_size, num_cols)
    probs = torch.empty(batch, chunk, device=rows.device, dtype=rows.dtype)
    d_rows = torch.zeros(batch, dim, device=rows.device, dtype=torch.float32)
    d_cols = torch.empty(num_cols, dim, device=rows.device, dtype=torch.float32)
    guide_dim, hardness_strength = scalars
    flags = _kernel_flags(rows.dtype)
    for col_start in range(0, num_cols, chunk):
        width = min(chunk, num_cols - col_start)
        _infonce_bwd_probs_kernel[(triton.cdiv(batch, blocks.m), triton.cdiv(width, blocks.n))](
            rows,
            cols,
            *pointers,
            scale,
            lse,
            probs,
            batch,
            num_cols,
            dim,
            guide_dim,
            col_start,
            width,
            hardness_strength,
            *strides,
            probs.stride(0),
            BLOCK_M=blocks.m,
            BLOCK_N=blocks.n,
            BLOCK_D=blocks.d,
            **constexprs,
            **flags,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )
        tile = probs[:, :width]  # [B, width]
        d_rows += _matmul_fp32(tile, cols[col_start : col_start + width])
        d_cols[col_start : col_start + width] = _matmul_fp32(tile.T, rows)
    return d_rows, d_cols


def _default_blocks(inputs: _Inputs, spec: Direction, tiles=default_block_sizes, **flags):
    """The tiles ``tiles`` (one of the ``default_*block_sizes``) gives this launch: the
    guide and the hardness term are the extra state that needs smaller ones."""
    extra_state = inputs.guide_q is not None or spec.hardness != 0
    return tiles(inputs.q.shape[1], inputs.q.dtype, extra_state, **flags)


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

    ``terms`` (:func:`losses.infonce.loss_terms`; ``symmetric`` is the shorthand for its
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
            blocks = block_sizes or _default_blocks(
                inputs, spec, default_forward_block_sizes, with_stats=with_stats
            )
            launches.append(_launch_forward(inputs, spec, scale, blocks, with_stats))
    lse, row_loss, stats = launches[0]
    if len(launches) == 1:
        return InfoNCEForward(loss=row_loss.mean(), lse=lse[None], stats=stats)
    stacked = torch.stack([launch[0] for launch in launches])
    if terms.joint:
        # loss_i = joint lse_i − positive logit_i, the latter as lse_i − loss_i of q→d.
        joint = torch.logsumexp(stacked, dim=0)
        return InfoNCEForward(loss=(row_loss + (joint - lse)).mean(), lse=joint[None], stats=stats)
    loss = sum(launch[1].mean() for launch in launches) / len(launches)
    return InfoNCEForward(loss=loss, lse=stacked, stats=stats)


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
    strategy (see the Math comment): ``"gemm"`` writes p − onehot for ``chunk_size``
    columns at a time (B × chunk_size in the input dtype) and multiplies it out with
    cuBLAS; ``"recompute"`` never stores a logit, recomputing them inside the gradient
    kernels. ``deterministic=False`` (``"recompute"`` only; ``"gemm"`` is deterministic)
    accumulates the column gradients with atomic adds from the row pass: one logit
    recomputation instead of two, but the fp32 summation order (hence the last bits)
    varies between runs on a GPU. ``block_sizes`` are the tiles of the chosen kernels.
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

    dq = dd = dscale = None
    with _on_device(q.device):
        for index, spec in enumerate(specs):
            term_lse = lse[0 if terms.joint else index].float().contiguous()
            if backward == "gemm":
                blocks = block_sizes or _default_blocks(inputs, spec, default_probs_block_sizes)
                d_rows, d_cols = _launch_backward_gemm(
                    inputs, spec, scale, term_lse, blocks, chunk_size
                )
            else:
                blocks = block_sizes or _default_blocks(inputs, spec)
                d_rows, d_cols = _launch_backward(
                    inputs, spec, scale, term_lse, deterministic, blocks
                )
            rows = spec.rows(q, d)
            term_dscale = torch.dot(rows.float().flatten(), d_rows.flatten())
            if dq is None:
                # query_to_doc comes first: its gradients are the totals' first terms.
                dq, dd, dscale = d_rows, d_cols, term_dscale
                continue
            dscale = dscale + term_dscale
            (dd[:batch] if spec.rows_are_docs else dq).add_(d_rows)
            (dq if spec.cols_are_queries else dd).add_(d_cols)
    weight = row_grad * scale
    return (dq * weight).to(q.dtype), (dd * weight).to(d.dtype), dscale * row_grad


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
    terms, extras = _validated_options(q, d, doc_ids, symmetric, options)
    return call_info_nce_op(
        q,
        d,
        scale_as_tensor(scale, q.device),
        doc_ids,
        terms,
        return_stats,
        fused=True,
        deterministic=deterministic,
        backward=backward,
        chunk_size=chunk_size,
        extras=extras,
    )
