"""Tile shapes and column chunks of the fused InfoNCE kernels, timed on one problem.

The defaults in ``kernels.infonce_launch`` (``default_forward_block_sizes``,
``default_probs_block_sizes`` and the "gemm" backward's ``chunk_size``) are chosen by
measurement: this script times the candidates on the GPU at one size, each against the
current default in the same run, and checks that each computes what the default does.
Three sweeps:

* ``forward``: :func:`kernels.infonce_host.infonce_forward` with doc ids (as training calls
  it), with and without the ranking statistics, per candidate tile;
* ``probs``: the "gemm" backward (:func:`kernels.infonce_host.infonce_backward`) per candidate
  tile of its probability kernel, at the default chunk, and the "recompute" backward;
* ``chunk``: the "gemm" backward per column chunk, at the default tile.

The summary (``--summary``) gives each sweep's default and its time, and the fastest
candidate where it is not the default, with its time over the default's.

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
from typing import NamedTuple

import torch
from common import report_header

from biencoder.kernels.infonce_host import infonce_backward, infonce_forward
from biencoder.kernels.infonce_launch import (
    BlockSizes,
    default_forward_block_sizes,
    default_probs_block_sizes,
)

TEMPERATURE = 0.05
DEFAULT_CHUNK = 4096
# (m, n, d, num_warps, num_stages); d_out is the recompute backward's, unused here. The
# half-precision defaults at D = 384 and 768 are 64×128×64 w4 s3 without the statistics and
# 64×64×64 w4 s4 with them (c4ebbd3, from the H200 run of 2026-11-26); the first row, the
# default before that, stays a candidate so that each run shows what the change gained.
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


class Result(NamedTuple):
    label: str
    is_default: bool
    seconds: float | str  # or why the candidate did not run
    deviation: float | None = None  # max |output − default's| / max |default's|


def _run(
    label: str,
    is_default: bool,
    work: Callable[[], torch.Tensor],
    device: str,
    args,
    reference: torch.Tensor | None,
) -> tuple[Result, torch.Tensor | None]:
    """Times ``work`` and compares its output with ``reference`` (the default's): a tile
    that runs fast but computes something else must not pass for a win."""
    try:
        output = work()
        seconds = _median_seconds(work, device, args)
    except Exception as error:  # a candidate the GPU cannot run is a row, not the end
        line = (str(error).splitlines() or [""])[0][:90]
        return Result(label, is_default, f"{type(error).__name__}: {line}"), None
    deviation = None
    if reference is not None:
        difference = (output.float() - reference.float()).abs().max()
        deviation = (difference / reference.float().abs().max()).item()
    return Result(label, is_default, seconds, deviation), output


def _sweep(
    candidates: list[tuple[str, bool, Callable[[], torch.Tensor]]], device: str, args
) -> list[Result]:
    """The default first: its output is what the others are compared with."""
    candidates = sorted(candidates, key=lambda candidate: not candidate[1])
    results, reference = [], None
    for label, is_default, work in candidates:
        result, output = _run(label, is_default, work, device, args, reference)
        if is_default:
            reference = output
        results.append(result)
    return results


def _rows(name: str, results: list[Result]) -> list[str]:
    """Rows of one sweep; the ratio is against the default, timed in the same sweep."""
    default = next((r.seconds for r in results if r.is_default), None)
    rows = []
    for result in results:
        mark = " (default)" if result.is_default else ""
        cells = [name, result.label + mark]
        if isinstance(result.seconds, str):
            cells += [result.seconds.replace("|", "/"), "–", "–"]
        else:
            ratio = f"{result.seconds / default:.2f}×" if isinstance(default, float) else "–"
            deviation = f"{result.deviation:.1e}" if result.deviation is not None else "–"
            cells += [f"{result.seconds * 1e3:.2f}", ratio, deviation]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _best(results: list[Result]) -> str:
    """The default's time and, where another candidate beat it, the fastest and its ratio."""
    default = next((r for r in results if r.is_default), None)
    timed = [(r.seconds, r.label) for r in results if isinstance(r.seconds, float)]
    if not timed:
        return "none ran"
    seconds, label = min(timed)
    if default is None or not isinstance(default.seconds, float):
        return f"default {default.seconds if default else 'missing'}; fastest {label}"
    line = f"default {default.label} {default.seconds * 1e3:.2f} ms"
    if label == default.label:
        return line + ", the fastest"
    return line + f"; fastest {label} ({seconds / default.seconds:.2f}×)"


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

    sweeps: dict[str, list[Result]] = {}
    for stats in (False, True):
        name = "forward + stats" if stats else "forward"
        default = default_forward_block_sizes(args.dim, dtype, with_stats=stats)
        tiles = [default] + [
            blocks
            for blocks in (_blocks(c, default.d_out) for c in FORWARD_CANDIDATES)
            if blocks != default
        ]
        sweeps[name] = _sweep(
            [
                (
                    _label(blocks),
                    blocks == default,
                    lambda b=blocks, s=stats: (
                        infonce_forward(q, d, scale, doc_ids, block_sizes=b, return_stats=s).lse
                    ),
                )
                for blocks in tiles
            ],
            device,
            args,
        )
        print("\n".join(_rows(name, sweeps[name])), flush=True)

    def gemm_backward(blocks: BlockSizes | None, chunk: int) -> Callable[[], torch.Tensor]:
        return lambda: infonce_backward(
            q, d, scale, grad, lse, doc_ids, block_sizes=blocks, backward="gemm", chunk_size=chunk
        )[0]

    default = default_probs_block_sizes(args.dim, dtype)
    tiles = [default] + [blocks for blocks in map(_blocks, PROBS_CANDIDATES) if blocks != default]
    candidates = [
        (_label(blocks), blocks == default, gemm_backward(blocks, DEFAULT_CHUNK))
        for blocks in tiles
    ]
    # The in-kernel recomputation, for the ratio of the two backward strategies.
    candidates.append(
        (
            "recompute backward, its default tiles",
            False,
            lambda: infonce_backward(q, d, scale, grad, lse, doc_ids, backward="recompute")[0],
        )
    )
    sweeps["probs"] = _sweep(candidates, device, args)
    print("\n".join(_rows("probs", sweeps["probs"])), flush=True)
    sweeps["chunk"] = _sweep(
        [(str(chunk), chunk == DEFAULT_CHUNK, gemm_backward(None, chunk)) for chunk in CHUNKS],
        device,
        args,
    )
    print("\n".join(_rows("chunk", sweeps["chunk"])), flush=True)

    notes = [
        f"B = N = {args.size}, D = {args.dim}, {args.dtype}, doc ids, temperature {TEMPERATURE};"
        f" median of {args.repeats} after {args.warmups} warm-ups",
        "tiles m×n×d (rows, columns, K step), warps, pipeline stages; time / default is"
        " against the default of the same sweep; deviation: max |output − default's output|"
        " / max |default's output|, of lse (forward) or dq (backward)",
    ]
    header = report_header("InfoNCE kernel tiles", device, load_at_start, notes)
    table = [
        "| sweep | candidate | ms | time / default | deviation |",
        "|---|---|---|---|---|",
    ]
    for name, results in sweeps.items():
        table += _rows(name, results)
    text = "\n".join(header + table) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.summary:
        best = "; ".join(f"{name}: {_best(results)}" for name, results in sweeps.items())
        args.summary.write_text(f"{best}\n")
    print(text)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
