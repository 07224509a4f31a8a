"""Tile shapes and launchers of the InfoNCE kernels (:mod:`kernels.infonce`): the tile
tables for each kernel, the kernel flags that follow torch's settings, and one direction's
launch of the forward, the "recompute" backward or the "gemm" backward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from biencoder.kernels.infonce import (
    INTERPRETED,
    infonce_bwd_dd_kernel,
    infonce_bwd_dq_kernel,
    infonce_bwd_probs_kernel,
    infonce_fwd_kernel,
)
from biencoder.kernels.infonce_options import Direction, InfoNCEStats, LossTerms


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
# `python -m biencoder.kernels.compile_check` (and tests/test_kernel_compile.py) shows every kernel
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
    if INTERPRETED:
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
    if not INTERPRETED and half and not extra_state and (dim, dtype) in _HOPPER_BLOCK_SIZES:
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
    if INTERPRETED:
        return default_block_sizes(dim, dtype, extra_state)
    if dtype in (torch.float16, torch.bfloat16) and not extra_state:
        return BlockSizes(m=128, n=128, d=64, d_out=16, num_warps=8, num_stages=3)
    return BlockSizes(m=64, n=64, d=32, d_out=16, num_warps=4, num_stages=3)


@dataclass(frozen=True)
class KernelInputs:
    """Validated, contiguous inputs of one loss (:func:`kernels.infonce_host.infonce_forward`
    builds them): what the launches of its directions read."""

    q: torch.Tensor
    d: torch.Tensor
    doc_ids: torch.Tensor | None
    owners: torch.Tensor | None
    guide_q: torch.Tensor | None
    guide_d: torch.Tensor | None
    thresholds: torch.Tensor | None
    terms: LossTerms


def _matmul_allows_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    # The fp32_precision API (torch >= 2.9) reflects the legacy flag too, while reading the
    # legacy allow_tf32 raises once TF32 was set through fp32_precision.
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def kernel_flags(dtype: torch.dtype) -> dict[str, object]:
    # fp32 inputs follow torch's own matmul setting, so the fused loss matches a plain
    # `q @ d.T` reference unless the user opted into TF32 there too.
    allow_tf32 = _matmul_allows_tf32()
    return {
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32",
        "UPCAST_DOT": INTERPRETED and dtype == torch.bfloat16,
    }


def _direction_args(inputs: KernelInputs, spec: Direction, placeholder: torch.Tensor):
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


def launch_forward(
    inputs: KernelInputs,
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
    infonce_fwd_kernel[grid](
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
        **kernel_flags(rows.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return lse, row_loss, stats


def launch_backward(
    inputs: KernelInputs,
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
    flags = kernel_flags(rows.dtype)
    k_slices = triton.cdiv(dim, blocks.d_out)
    infonce_bwd_dq_kernel[(triton.cdiv(batch, blocks.m), k_slices)](
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
        infonce_bwd_dd_kernel[(triton.cdiv(num_cols, blocks.n), k_slices)](
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


def launch_backward_gemm(
    inputs: KernelInputs,
    spec: Direction,
    scale: torch.Tensor,
    lse: torch.Tensor,
    blocks: BlockSizes,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction, as :func:`launch_backward` returns it, by column chunks: the
    probability kernel writes P = p − onehot [B, chunk] once per chunk, and two GEMMs
    take dq += P·cols and dd_chunk = Pᵀ·rows (see the Math comment of
    :mod:`kernels.infonce`)."""
    batch, dim = inputs.q.shape
    rows, cols, pointers, scalars, strides, constexprs = _direction_args(inputs, spec, lse)
    num_cols = cols.shape[0]
    chunk = min(chunk_size, num_cols)
    probs = torch.empty(batch, chunk, device=rows.device, dtype=rows.dtype)
    d_rows = torch.zeros(batch, dim, device=rows.device, dtype=torch.float32)
    d_cols = torch.empty(num_cols, dim, device=rows.device, dtype=torch.float32)
    guide_dim, hardness_strength = scalars
    flags = kernel_flags(rows.dtype)
    for col_start in range(0, num_cols, chunk):
        width = min(chunk, num_cols - col_start)
        infonce_bwd_probs_kernel[(triton.cdiv(batch, blocks.m), triton.cdiv(width, blocks.n))](
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


def default_blocks(inputs: KernelInputs, spec: Direction, tiles=default_block_sizes, **flags):
    """The tiles ``tiles`` (one of the ``default_*block_sizes``) gives this launch: the
    guide and the hardness term are the extra state that needs smaller ones."""
    extra_state = inputs.guide_q is not None or spec.hardness != 0
    return tiles(inputs.q.shape[1], inputs.q.dtype, extra_state, **flags)
