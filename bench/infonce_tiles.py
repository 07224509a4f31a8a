"""Tile shapes and column chunks of the fused InfoNCE kernels, timed on one problem.

The defaults in ``kernels.infonce`` (``default_block_sizes``, ``default_probs_block_sizes``
and the "gemm" backward's ``chunk_size``) were chosen by compiling for sm_90 on a CPU;
this script times the candidates on the GPU, at one size, so that the table can be
chosen by measurement. Three sweeps, each against the current default in the same run:

* ``forward``: :func:`kernels.infonce.infonce_forward` with doc ids (as training calls
  it), with and without the ranking statistics, per candidate tile;
* ``probs``: the "gemm" backward (:func:`kernels.infonce.infonce_backward`) per candidate
  tile of its probability kernel, at the default chunk, and the "recompute" backward;
* ``chunk``: the "gemm" backward per column chunk, at the default tile.

A candidate that fails (too much shared memory, say) gets its error in its row. Each
time is the median of ``--repeats`` runs after ``--warmups``, CUDA-synchronised.

Examples (the device check; a CPU rehearsal under the interpreter)::

    python bench/infonce_tiles.py --size 16384 --dim 768 --out tiles.md
    TRITON_INTERPRET=1 python bench/infonce_tiles.py --device cpu --size 64 --dim 32 \\
        --repeats 1 --warmups 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report_header

from kernels.infonce import (
    BlockSizes,
    default_block_sizes,
    default_probs_block_sizes,
    infonce_backward,
    infonce_forward,
)

TEMPERATURE = 0.05
DEFAULT_CHUNK = 4096
# (m, n, d, num_warps, num_stages); d_out is the recompute backward's, unused here.
FORWARD_CANDIDATES = [
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (128, 128, 64, 8, 4),
    (256, 64, 32, 8, 3),
]
PROBS_CANDIDATES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 4),
    (256, 128, 64, 8, 3),
]
CHUNKS = [1024, 2048, 4096, 8192, 16384]


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="B = N")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--summary", type=Path, help="write a one-line summary here")
    return parser.parse_args(argv)


def _blocks(candidate: tuple[int, ...], d_out: int = 16) -> BlockSizes:
    m, n, d, warps, stages = candidate
    return BlockSizes(m=m, n=n, d=d, d_out=d_out, num_warps=warps, num_stages=stages)


def _label(blocks: BlockSizes) -> str:
    return f"{blocks.m}×{blocks.n}×{blocks.d} w{blocks.num_warps} s{blocks.num_stages}"


def _median_seconds(work: Callable[[], object], device: str, args) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmups):
        once()
    return statistics.median(once() for _ in range(max(args.repeats, 1)))


def _timed(work: Callable[[], object], device: str, args) -> float | str:
    try:
        return _median_seconds(work, device, args)
    except Exception as error:  # a candidate the GPU cannot run is a row, not the end
        line = (str(error).splitlines() or [""])[0][:90]
        return f"{type(error).__name__}: {line}"


def _rows(name: str, results: list[tuple[str, bool, float | str]]) -> list[str]:
    """Rows of one sweep; the ratio is against the default, timed in the same sweep."""
    default = next((t for _, is_default, t in results if is_default), None)
    rows = []
    for label, is_default, seconds in results:
        mark = " (default)" if is_default else ""
        if isinstance(seconds, str):
            rows.append(f"| {name} | {label}{mark} | {seconds.replace('|', '/')} | – |")
            continue
        ratio = f"{seconds / default:.2f}×" if isinstance(default, float) else "–"
        rows.append(f"| {name} | {label}{mark} | {seconds * 1e3:.2f} | {ratio} |")
    return rows


def _best(results: list[tuple[str, bool, float | str]]) -> str:
    timed = [(seconds, label) for label, _, seconds in results if isinstance(seconds, float)]
    return min(timed)[1] if timed else "none ran"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    load_at_start = os.getloadavg()[0]
    generator = torch.Generator(device=device).manual_seed(0)

    def unit_rows(rows: int) -> torch.Tensor:
        x = torch.randn(rows, args.dim, device=device, generator=generator)
        return torch.nn.functional.normalize(x, dim=1).to(dtype)

    q, d = unit_rows(args.size), unit_rows(args.size)
    doc_ids = torch.arange(args.size, device=device)
    scale = 1 / TEMPERATURE
    grad = torch.ones((), device=device)
    lse = infonce_forward(q, d, scale, doc_ids).lse

    sweeps: dict[str, list[tuple[str, bool, float | str]]] = {}
    default_forward = default_block_sizes(args.dim, dtype)
    for stats in (False, True):
        name = "forward + stats" if stats else "forward"
        candidates = [default_forward] + [
            blocks
            for blocks in (_blocks(c, default_forward.d_out) for c in FORWARD_CANDIDATES)
            if blocks != default_forward
        ]
        sweeps[name] = [
            (
                _label(blocks),
                blocks == default_forward,
                _timed(
                    lambda b=blocks, s=stats: infonce_forward(
                        q, d, scale, doc_ids, block_sizes=b, return_stats=s
                    ),
                    device,
                    args,
                ),
            )
            for blocks in candidates
        ]
        print("\n".join(_rows(name, sweeps[name])), flush=True)

    def gemm_backward(blocks: BlockSizes | None, chunk: int) -> Callable[[], object]:
        return lambda: infonce_backward(
            q, d, scale, grad, lse, doc_ids, block_sizes=blocks, backward="gemm", chunk_size=chunk
        )

    default_probs = default_probs_block_sizes(args.dim, dtype)
    candidates = [default_probs] + [
        blocks for blocks in map(_blocks, PROBS_CANDIDATES) if blocks != default_probs
    ]
    sweeps["probs"] = [
        (
            _label(blocks),
            blocks == default_probs,
            _timed(gemm_backward(blocks, DEFAULT_CHUNK), device, args),
        )
        for blocks in candidates
    ]
    # The in-kernel recomputation, for the ratio of the two backward strategies.
    recompute = _timed(
        lambda: infonce_backward(q, d, scale, grad, lse, doc_ids, backward="recompute"),
        device,
        args,
    )
    sweeps["probs"].append(("recompute backward, its default tiles", False, recompute))
    print("\n".join(_rows("probs", sweeps["probs"])), flush=True)
    sweeps["chunk"] = [
        (str(chunk), chunk == DEFAULT_CHUNK, _timed(gemm_backward(None, chunk), device, args))
        for chunk in CHUNKS
    ]
    print("\n".join(_rows("chunk", sweeps["chunk"])), flush=True)

    notes = [
        f"B = N = {args.size}, D = {args.dim}, {args.dtype}, doc ids, temperature {TEMPERATURE};"
        f" median of {args.repeats} after {args.warmups} warm-ups",
        "tiles m×n×d (rows, columns, K step), warps, pipeline stages; time / default is"
        " against the default of the same sweep",
    ]
    header = report_header("InfoNCE kernel tiles", device, load_at_start, notes)
    table = ["| sweep | candidate | ms | time / default |", "|---|---|---|---|"]
    for name, results in sweeps.items():
        table += _rows(name, results)
    text = "\n".join(header + table) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.summary:
        best = "; ".join(f"{name}: {_best(results)}" for name, results in sweeps.items())
        args.summary.write_text(f"fastest per sweep: {best}\n")
    print(text)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
