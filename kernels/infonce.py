"""Fused InfoNCE (in-batch negatives + shared hard negatives) as Triton kernels.

The B×N logit matrix is never materialised: the forward pass keeps only the per-row
logsumexp, the backward pass recomputes each logit tile from q and d. Memory is O(B + N)
beyond the inputs and their gradients. Every direction, partition, the guide-model filter
and the hardness weighting of :mod:`losses.infonce` run on the same kernels.

This module holds the kernels and their math; the device functions they share compute one
tile (:mod:`kernels.infonce_logit_tiles`), :mod:`kernels.infonce_launch` picks the tiles
and launches them, and :mod:`kernels.infonce_host` is the host side: validation, one
launch per direction, and the functions to call.

On a machine without CUDA the kernels run under Triton's interpreter on CPU tensors; set
``TRITON_INTERPRET=1`` before this module is imported (Triton reads it when the kernels are
decorated).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from biencoder.kernels.infonce_logit_tiles import (
    direction_exclusions,
    dot,
    excluded_columns,
    load_row_doc_ids,
    load_row_thresholds,
    raw_dot_tile,
    unweighted_dlogits_tile,
    with_hardness,
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
#   ∂/∂q_i     = s·Σ_j dlogits_ij·d_j            (infonce_bwd_dq_kernel, rows own dq)
#   ∂/∂d_j     = s·Σ_i dlogits_ij·q_i            (infonce_bwd_dd_kernel, columns own dd;
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
# launches one per direction, see kernels.infonce_options.Direction):
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
#   "gemm"       column chunks of C documents: infonce_bwd_probs_kernel recomputes each
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


@triton.jit
def infonce_fwd_kernel(
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
    row_doc_ids = load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)

    running_max = tl.full((BLOCK_M,), _RUNNING_MAX_INIT, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best_other = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_other_index = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    false_negatives = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        raw = raw_dot_tile(
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
        doc_id_excluded = excluded_columns(doc_ids_ptr, rows, cols, row_doc_ids, N, HAS_DOC_IDS)
        excluded = direction_exclusions(
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
        logits = with_hardness(
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
def infonce_bwd_dq_kernel(
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
    row_doc_ids = load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
    q_out = tl.load(
        q_ptr + rows.to(tl.int64)[:, None] * stride_q + ks[None, :],
        mask=row_in[:, None] & k_in[None, :],
        other=0.0,
    )

    dq_acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_in = cols < N
        dlogits = unweighted_dlogits_tile(
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
        dq_acc = dot(dlogits.to(d_out.dtype), d_out, dq_acc, INPUT_PRECISION, UPCAST_DOT)
        if ATOMIC_DD:
            dd_part = dot(
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
def infonce_bwd_dd_kernel(
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
        row_doc_ids = load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
        row_thresholds = load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
        dlogits = unweighted_dlogits_tile(
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
        dd_acc = dot(tl.trans(dlogits).to(q_out.dtype), q_out, dd_acc, INPUT_PRECISION, UPCAST_DOT)

    tl.store(
        dd_ptr + cols.to(tl.int64)[:, None] * stride_dd + ks[None, :],
        dd_acc,
        mask=col_in[:, None] & k_in[None, :],
    )


@triton.jit
def infonce_bwd_probs_kernel(
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
    row_doc_ids = load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS)
    row_thresholds = load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE)
    dlogits = unweighted_dlogits_tile(
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


# Decided when the kernels above were decorated, so it must be read at import, not per call.
INTERPRETED = knobs.runtime.interpret
