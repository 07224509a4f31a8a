"""Benchmark InfoNCE implementations: forward+backward time and peak extra memory.

Compares ``naive`` (matmul + cross-entropy), ``torch`` (chunked online logsumexp),
``triton`` (the fused kernel, CUDA only) and ``inf_cl`` (Inf-CL's single-GPU
``cal_flash_loss``, CUDA only, when the ``inf-cl`` package is importable) for B = N
documents (no extra hard negatives), each configuration in a fresh subprocess so that its
peak memory is not polluted by the previous one. Peak extra memory is what the loss
allocates beyond its inputs: on CPU the growth of the resident set size, on GPU
``torch.cuda.max_memory_allocated`` minus what was allocated before the call. On GPU the
table also reports achieved TFLOP/s, counting 8·B·N·D flops per direction (forward logits,
backward recomputation, and the two gradient products). An allocation failure is recorded
as ``OOM``.

Example (the CPU table committed in bench/results/infonce_cpu.md)::

    python bench/infonce.py --sizes 4096 8192 16384 --dims 384 --dtypes fp32 \\
        --out bench/results/infonce_cpu.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import common
from common import (
    MIB,
    REPO_ROOT,
    is_oom,
    measure_in_subprocess,
    peak_extra_rss,
    report_header,
)

SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DIMS = (128, 384, 768)
DTYPES = ("fp32", "bf16")
IMPLS = ("naive", "torch", "triton", "inf_cl")
GPU_ONLY_IMPLS = ("triton", "inf_cl")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="batch sizes B (= N) to measure"
    )
    parser.add_argument(
        "--dims", type=int, nargs="+", default=list(DIMS), help="embedding dimensions D"
    )
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="implementations; triton and inf_cl are skipped without CUDA",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--symmetric", action="store_true", help="add the doc→query term")
    parser.add_argument("--chunk-size", type=int, default=4096, help="chunk of impl=torch")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs after the first (memory) run; the median is kept",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds before a configuration is recorded as a timeout",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process.
# ------------------------------------------------------------------------------------------


def _loss_fn(impl: str, config: dict):
    import torch

    temperature = 0.05
    if impl == "inf_cl":
        from inf_cl import cal_flash_loss

        dim = config["dim"]
        head_dim = next(h for h in (256, 128, 64, 32, 16) if dim % h == 0)
        return lambda q, d: cal_flash_loss(q, d, scale=1 / temperature, head_dim=head_dim).mean()

    from losses.infonce import info_nce

    def loss(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return info_nce(
            q,
            d,
            temperature,
            symmetric=config["symmetric"],
            impl=impl,
            chunk_size=config["chunk_size"],
        )

    return loss


def _run_worker(config: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    device = torch.device(config["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config["dtype"]]
    size, dim = config["size"], config["dim"]
    loss_fn = _loss_fn(config["impl"], config)
    on_gpu = device.type == "cuda"

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def step(q: torch.Tensor, d: torch.Tensor) -> float:
        q.grad = d.grad = None
        synchronize()
        start = time.perf_counter()
        loss_fn(q, d).backward()
        synchronize()
        return time.perf_counter() - start

    generator = torch.Generator(device=device).manual_seed(0)

    def embeddings(rows: int) -> torch.Tensor:
        x = torch.randn(rows, dim, device=device, generator=generator)
        return torch.nn.functional.normalize(x, dim=1).to(dtype).requires_grad_()

    # A tiny warm-up loads kernels and thread pools before the baseline is taken.
    step(embeddings(64), embeddings(64))
    q, d = embeddings(size), embeddings(size)
    try:
        if on_gpu:
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            first = step(q, d)
            peak_extra = torch.cuda.max_memory_allocated() - baseline
        else:
            first, peak_extra = peak_extra_rss(lambda: step(q, d))
        times = [step(q, d) for _ in range(config["repeats"])] or [first]
    except (RuntimeError, MemoryError) as error:
        if isinstance(error, MemoryError) or is_oom(error):
            return {"status": "OOM"}
        raise
    return {"status": "ok", "seconds": statistics.median(times), "peak_extra_bytes": peak_extra}


# ------------------------------------------------------------------------------------------
# Driver: spawn workers, build the table.
# ------------------------------------------------------------------------------------------


def _format_row(config: dict, result: dict, naive: dict | None, on_gpu: bool) -> str:
    cells = [config["impl"], str(config["size"]), str(config["dim"]), config["dtype"]]
    if result["status"] != "ok":
        cells += [result["status"]] + ["–"] * (4 + on_gpu)
        return "| " + " | ".join(cells) + " |"
    seconds, peak = result["seconds"], result["peak_extra_bytes"]
    naive_ok = naive is not None and naive["status"] == "ok"
    cells += [
        f"{seconds * 1e3:.1f}",
        f"{seconds / naive['seconds']:.2f}×" if naive_ok else "–",
        f"{peak / MIB:.1f}",
        f"{naive['peak_extra_bytes'] / max(peak, 1):.1f}×" if naive_ok else "–",
    ]
    if on_gpu:
        directions = 2 if config["symmetric"] else 1
        flops = 8 * directions * config["size"] ** 2 * config["dim"]
        cells.append(f"{flops / seconds / 1e12:.1f}")
    return "| " + " | ".join(cells) + " |"


def _table_header(on_gpu: bool) -> list[str]:
    columns = [
        "impl",
        "B = N",
        "D",
        "dtype",
        "fwd+bwd ms",
        "time / naive",
        "peak extra MiB",
        "naive mem / mem",
    ]
    if on_gpu:
        columns.append("TFLOP/s")
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _run_driver(args: argparse.Namespace) -> str:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    impls = [impl for impl in args.impls if on_gpu or impl not in GPU_ONLY_IMPLS]
    if importlib.util.find_spec("inf_cl") is None and "inf_cl" in impls:
        impls.remove("inf_cl")
    # Other processes on the machine skew the timings; the header records how busy it was.
    load_at_start = os.getloadavg()[0]
    # naive first, so the other impls' ratios refer to a measurement from the same run.
    impls.sort(key=lambda impl: impl != "naive")
    rows = _table_header(on_gpu)
    print("\n".join(rows), flush=True)
    for dtype in args.dtypes:
        for dim in args.dims:
            for size in args.sizes:
                naive = None
                for impl in impls:
                    config = {
                        "impl": impl,
                        "size": size,
                        "dim": dim,
                        "dtype": dtype,
                        "device": device,
                        "symmetric": args.symmetric,
                        "chunk_size": args.chunk_size,
                        "repeats": args.repeats,
                    }
                    result = measure_in_subprocess(Path(__file__).resolve(), config, args.timeout)
                    if impl == "naive":
                        naive = result
                    rows.append(_format_row(config, result, naive, on_gpu))
                    print(rows[-1], flush=True)

    header = report_header(
        "InfoNCE benchmark",
        device,
        load_at_start,
        [
            f"fwd+bwd ms: median of {args.repeats} runs after a first run that measures memory;"
            f" temperature 0.05, symmetric={args.symmetric}, chunk_size={args.chunk_size}"
        ],
    )
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    common.main(_parse_args(argv), _run_worker, _run_driver)


if __name__ == "__main__":
    main()
