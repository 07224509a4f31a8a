"""The device functions of the InfoNCE kernels (:mod:`kernels.infonce`): one tile's logit
products, the masks of the logits that leave the softmax, the hardness term, and the
backward's p − onehot, recomputed from q and d. The Math comment of :mod:`kernels.infonce`
defines each."""

from __future__ import annotations

import triton
import triton.language as tl

from biencoder.kernels.infonce_options import DIAGONAL_EXCLUDED, HARDNESS_CODES

# infonce_options' DIAGONAL_EXCLUDED and HARDNESS_CODES, as constexprs the kernels can read.
_DIAGONAL_EXCLUDED = tl.constexpr(DIAGONAL_EXCLUDED)
_HARDNESS_OWN = tl.constexpr(HARDNESS_CODES["hard_negatives"])
_HARDNESS_ALL = tl.constexpr(HARDNESS_CODES["all_negatives"])


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 storage. Products
    # of bf16 values are exact in fp32, so upcasting first yields the same products that
    # bf16 tensor cores accumulate in fp32.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def raw_dot_tile(
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
        acc = dot(q_tile, tl.trans(d_tile), acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def load_row_doc_ids(doc_ids_ptr, rows, B, HAS_DOC_IDS: tl.constexpr):
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
def load_row_thresholds(threshold_ptr, rows, B, HAS_GUIDE: tl.constexpr):
    # As load_row_doc_ids: one return, a placeholder tensor without the guide.
    if HAS_GUIDE:
        thresholds = tl.load(threshold_ptr + rows, mask=rows < B, other=0.0)
    else:
        thresholds = tl.zeros(rows.shape, dtype=tl.float32)
    return thresholds


@triton.jit
def excluded_columns(
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
def direction_exclusions(
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
        guide_scores = raw_dot_tile(
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
def with_hardness(
    logits, raw, owners_ptr, rows, cols, B, N, hardness_strength, HARDNESS: tl.constexpr
):
    """logits + α·r on the columns HARDNESS selects (a stop-gradient term; see the Math
    comment of kernels.infonce)."""
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
def unweighted_dlogits_tile(
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
    excluded = excluded_columns(doc_ids_ptr, rows, cols, row_doc_ids, N, HAS_DOC_IDS)
    excluded = direction_exclusions(
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
    logits = with_hardness(
        raw * scale, raw, owners_ptr, rows, cols, B, N, hardness_strength, HARDNESS
    )
    probs = tl.where(excluded, 0.0, tl.exp(logits - row_lse[:, None]))
    if DIAGONAL == 0:
        is_positive = (rows[:, None] == cols[None, :]) & (rows[:, None] < B)
        probs = probs - is_positive.to(tl.float32)
    return probs
