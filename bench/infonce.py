"""Benchmark InfoNCE implementations: forward+backward time and peak extra memory.

Implementations (``--impls``):

* ``naive``: matmul + cross-entropy, the B×N logits materialised;
* ``compiled``: the same function through ``torch.compile`` (dynamic shapes, so one
  compilation serves every size);
* ``torch``: the chunked online-logsumexp path of ``kernels.infonce_chunked``;
* ``triton``: the fused kernel (``kernels.infonce``), its default "gemm" backward
  (``--chunk-size`` columns of p − onehot at a time, multiplied out by cuBLAS); CUDA, or
  CPU tensors when ``TRITON_INTERPRET=1`` is set (tiny sizes only);
* ``triton_recompute``: the same forward with the "recompute" backward, which never
  stores a logit (O(B + N) memory);
* ``inf_cl``: Inf-CL's single-GPU ``inf_cl.cal_flash_loss`` (``pip install inf-cl``; CUDA
  only), reported as not installed when it does not import. It upcasts its inputs to fp32
  and multiplies them in TF32 whatever the input dtype.

Problems (``--problems``), B queries against N documents, temperature 0.05:

* ``in_batch``: N = B, the query→document direction;
* ``hard_neg``: one hard negative per query shared by all queries, N = 2B;
* ``symmetric``: N = B, both directions averaged: CLIP's loss, the problem Inf-CL solves
  (its rows call ``cal_flash_loss`` once per direction). ``--symmetric`` is the same as
  ``--problems symmetric``.

Loss options (``--variants``, :data:`VARIANTS`), each timed beside ``plain`` in the same run
so that the table's ``time / plain`` column is the option's cost for that implementation:
``gte`` (all four directions, one joint partition), ``d2q-joint`` (query→doc and doc→query
in one partition), ``hardness`` (in-batch hardness weighting, α = 9), ``hard-negatives``
(own hard negatives, α = 5; only meaningful with hard negatives), ``guide`` (the GISTEmbed
guide filter, guide embeddings of dimension D, margin 0) and ``everything`` (all of them).
The guide embeddings are random unit rows made beside q and d, not counted in the time.
A variant that cannot combine with a problem (directions with ``symmetric``; any option
with Inf-CL) is reported as an error row.

Peak extra memory is what the loss allocates beyond its inputs: on CPU the growth of the
resident set size, on GPU ``torch.cuda.max_memory_allocated`` minus what was allocated
before the call. On CPU each configuration runs in a fresh process (freed heap would
hide the next one's growth); on CUDA each implementation runs in one process, which
compiles once and measures memory per call (``--isolate`` overrides). An allocation
failure is recorded as ``OOM``. On GPU the table also reports achieved TFLOP/s counting
8·B·N·D flops per direction (forward logits, backward recomputation and the two gradient
products) and, with ``--peak-tflops``, that as a share of the measured bf16 matmul peak.

``--fit-search`` looks for the largest B that fits in memory for each implementation (at
the first dtype, the widest D and the first problem): from the largest measured size it
doubles B until a step runs out of memory, until the next step would take more than
``--fit-seconds`` (a step costs about 4× its predecessor), or past ``--fit-max``. On CPU
out-of-memory means the kernel's OOM killer: keep ``--fit-max`` small there.

The summary (``--summary``) leads with the fused kernel's fwd+bwd at ``--target-size``
(B = N, the ``in_batch`` problem, the widest D, bf16 where measured) as a share of
``--peak-tflops`` against ``--target-percent``, then each implementation's time at the
largest size. Each worker's first call of a configuration (loading the kernels, or
``torch.compile`` compiling the loss) is timed and listed under the table, so a worker
stopped during it says so: ``timeout after N s in its first call``.

``--ceilings`` measures the device instead (name, driver, versions, bf16 matmul TFLOP/s,
copy bandwidth) and writes them as Markdown (``--out``) and JSON (``--json``).

Examples (the CPU table committed in bench/results/infonce_cpu.md; the GPU device check)::

    python bench/infonce.py --sizes 4096 8192 16384 --dims 384 --dtypes fp32 \\
        --out bench/results/infonce_cpu.md
    python bench/infonce.py --sizes 16384 65536 --dims 768 --dtypes bf16 \\
        --problems in_batch symmetric --fit-search --peak-tflops 790 --budget 170 \\
        --impls naive triton inf_cl triton_recompute torch --target-size 16384
    python bench/infonce.py --sizes 16384 65536 --dims 768 --dtypes bf16 --impls naive \\
        compiled --budget 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import MIB, is_oom, package_version, peak_extra_rss, report_header

SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DIMS = (128, 384, 768)
DTYPES = ("fp32", "bf16")
# The order workers run in under a --budget: the comparisons that matter most come first.
IMPLS = ("naive", "triton", "inf_cl", "triton_recompute", "torch", "compiled")
PROBLEMS = ("in_batch", "hard_neg", "symmetric")
TEMPERATURE = 0.05
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# Keyword options of losses.infonce.info_nce per variant; "guide" asks for guide embeddings.
VARIANTS = {
    "plain": {},
    "gte": {"directions": ALL_DIRECTIONS},
    "d2q-joint": {"directions": ("query_to_doc", "doc_to_query")},
    "hardness": {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
    "hard-negatives": {"hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    "guide": {"guide": True},
    "everything": {
        "directions": ALL_DIRECTIONS,
        "hardness_mode": "in_batch_negatives",
        "hardness_strength": 9.0,
        "guide": True,
    },
}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="batch sizes B (queries)"
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
        help="implementations; those that cannot run here are listed as skipped",
    )
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=["in_batch"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["plain"],
        help="loss options; plain is always measured too, for the time / plain ratio",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--symmetric", action="store_true", help="same as --problems symmetric")
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
        help="seconds before a worker process is stopped and its missing rows recorded",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole benchmark: no worker starts after it, a running one "
        "is stopped at it, and the rows left are recorded as skipped",
    )
    parser.add_argument(
        "--isolate",
        choices=("auto", "config", "impl"),
        default="auto",
        help="a process per configuration or per implementation (auto: config on CPU)",
    )
    parser.add_argument("--peak-tflops", type=float, help="bf16 matmul peak for the %% column")
    parser.add_argument(
        "--target-size",
        type=int,
        help="B = N at which the summary states the fused kernel's share of --peak-tflops"
        " (default: the smallest of --sizes)",
    )
    parser.add_argument(
        "--target-percent",
        type=float,
        default=50.0,
        help="the share of --peak-tflops the fused kernel's fwd+bwd should reach",
    )
    parser.add_argument("--fit-search", action="store_true", help="find the largest B that fits")
    parser.add_argument("--fit-seconds", type=float, default=10.0)
    parser.add_argument("--fit-max", type=int, default=1 << 22)
    parser.add_argument("--ceilings", action="store_true", help="measure the device and exit")
    parser.add_argument("--ceiling-size", type=int, help="matmul side (8192 on CUDA, 256 CPU)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, help="with --ceilings: also write them as JSON")
    parser.add_argument("--summary", type=Path, help="write a one-line summary here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.symmetric:
        args.problems = ["symmetric"]
    args.variants = ["plain", *(v for v in args.variants if v != "plain")]
    return args


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# Ceilings: what the device can do at best, for reading the kernel table against.
# ------------------------------------------------------------------------------------------


def _seconds_per_call(fn, device: str, warmups: int = 3, repeats: int = 10) -> float:
    for _ in range(warmups):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


def _driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    completed = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return completed.stdout.strip().splitlines()[0] if completed.returncode == 0 else "unknown"


def _matmul_tflops(device: str, size: int) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / _seconds_per_call(lambda: a @ b, device) / 1e12


def _copy_gbps(device: str, num_bytes: int) -> float:
    import torch

    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _seconds_per_call(lambda: dst.copy_(src), device) / 1e9


def measure_ceilings(device: str, size: int | None = None) -> dict:
    """Device facts and two ceilings: bf16 matmul TFLOP/s (random data; zeros run faster)
    and copy bandwidth, counting the bytes read and written."""
    import platform

    import torch

    on_gpu = device == "cuda"
    size = size or (8192 if on_gpu else 256)
    facts = {
        "device": common.device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "sentence-transformers": package_version("sentence-transformers"),
        "inf-cl": package_version("inf-cl"),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "driver": _driver_version(),
            "cuda runtime": torch.version.cuda,
            "multiprocessors": props.multi_processor_count,
            "memory GiB": round(props.total_memory / 2**30, 1),
        }
    copy_bytes = (1 << 30) if on_gpu else (16 << 20)
    facts |= {
        "bf16_tflops": round(_matmul_tflops(device, size), 3),
        "matmul side": size,
        "copy_gbps": round(_copy_gbps(device, copy_bytes), 1),
        "copy MiB": copy_bytes // MIB,
    }
    return facts


def _ceilings_report(facts: dict) -> str:
    rows = [f"| {key} | {value} |" for key, value in facts.items()]
    return "\n".join(
        [
            "# Device and ceilings",
            "",
            "bf16_tflops: mean of 10 products of two random square bf16 matrices of side"
            " 'matmul side' after 3 warm-ups; copy_gbps: a 'copy MiB' device-to-device copy,"
            " bytes read plus written.",
            "",
            "| what | value |",
            "|---|---|",
            *rows,
            "",
        ]
    )


# ------------------------------------------------------------------------------------------
# Worker: one implementation's configurations, in its own process.
# ------------------------------------------------------------------------------------------


def _options(variant: str, symmetric: bool) -> dict:
    """info_nce's keyword options of ``variant`` (without the guide tensors)."""
    options = {k: v for k, v in VARIANTS[variant].items() if k != "guide"}
    if symmetric and "directions" in options:
        raise ValueError(f"variant {variant} sets directions, which symmetric fixes")
    return options


def _loss_fn(impl: str, symmetric: bool, chunk_size: int, dim: int, variant: str = "plain"):
    """fn(q, d, **guides) -> loss of ``impl`` with ``variant``'s options."""
    import torch

    scale = 1 / TEMPERATURE
    if impl == "inf_cl" and variant != "plain":
        raise ValueError("inf_cl has no loss options")
    options = _options(variant, symmetric)
    if impl == "inf_cl":
        from inf_cl import cal_flash_loss

        head_dim = next(h for h in (256, 128, 64, 32, 16) if dim % h == 0)

        def inf_cl_loss(q: torch.Tensor, d: torch.Tensor, **_guides) -> torch.Tensor:
            loss = cal_flash_loss(q, d, scale=scale, head_dim=head_dim).mean()
            if symmetric:
                backward = cal_flash_loss(d[: q.shape[0]], q, scale=scale, head_dim=head_dim)
                loss = (loss + backward.mean()) / 2
            return loss

        return inf_cl_loss
    from biencoder.losses.infonce import info_nce
    from biencoder.losses.infonce_naive import naive_info_nce

    if impl == "compiled":
        compiled = torch.compile(naive_info_nce, dynamic=True)
        return lambda q, d, **guides: compiled(q, d, scale, symmetric, **options, **guides)
    if impl == "triton_recompute":
        from biencoder.kernels.infonce_op import fused_info_nce

        return lambda q, d, **guides: fused_info_nce(
            q, d, scale, symmetric, backward="recompute", **options, **guides
        )
    return lambda q, d, **guides: info_nce(
        q,
        d,
        TEMPERATURE,
        symmetric=symmetric,
        impl=impl,
        chunk_size=chunk_size,
        **options,
        **guides,
    )


def _num_docs(size: int, problem: str) -> int:
    return 2 * size if problem == "hard_neg" else size


class _Runner:
    """Measures single configurations of one implementation on one device."""

    def __init__(self, impl: str, device: str, chunk_size: int) -> None:
        import torch

        self.impl = impl
        self.device = torch.device(device)
        self.on_gpu = device == "cuda"
        self.chunk_size = chunk_size
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.losses: dict[tuple, object] = {}

    def _embeddings(self, rows: int, dim: int, dtype, requires_grad: bool = True):
        import torch

        x = torch.randn(rows, dim, device=self.device, generator=self.generator)
        return torch.nn.functional.normalize(x, dim=1).to(dtype).requires_grad_(requires_grad)

    def _guides(self, config: dict, size: int, dtype) -> dict:
        """The guide embeddings the variant needs (none, or [B, D] and [N, D]), no grad."""
        if not VARIANTS[config.get("variant", "plain")].get("guide"):
            return {}
        num_docs = _num_docs(size, config["problem"])
        return {
            "guide_q": self._embeddings(size, config["dim"], dtype, requires_grad=False),
            "guide_d": self._embeddings(num_docs, config["dim"], dtype, requires_grad=False),
        }

    def _loss(self, config: dict):
        import torch

        variant = config.get("variant", "plain")
        key = (config["dim"], config["dtype"], config["problem"], variant)
        if key not in self.losses:
            loss = _loss_fn(
                self.impl,
                config["problem"] == "symmetric",
                self.chunk_size,
                config["dim"],
                variant,
            )
            # A tiny warm-up loads kernels, compiles and starts thread pools before a
            # baseline is taken; how long it took is reported (torch.compile's compilation).
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config["dtype"]]
            q = self._embeddings(64, config["dim"], dtype)
            d = self._embeddings(_num_docs(64, config["problem"]), config["dim"], dtype)
            start = time.perf_counter()
            guides = self._guides(config, 64, dtype)
            loss(q, d, **guides).backward()
            # The forward-only timing runs without autograd: torch.compile compiles that
            # graph apart, and its compilation must not land in the "fwd ms" column.
            with torch.no_grad():
                loss(q, d, **guides)
            _synchronize(self.device.type)
            _emit({"warmup": [*key, time.perf_counter() - start]})
            self.losses[key] = loss
        return self.losses[key]

    def _forward(self, loss_fn, q, d, guides) -> float:
        import torch

        with torch.no_grad():
            _synchronize(self.device.type)
            start = time.perf_counter()
            loss_fn(q, d, **guides)
            _synchronize(self.device.type)
        return time.perf_counter() - start

    def _step(self, loss_fn, q, d, guides) -> float:
        q.grad = d.grad = None
        _synchronize(self.device.type)
        start = time.perf_counter()
        loss_fn(q, d, **guides).backward()
        _synchronize(self.device.type)
        return time.perf_counter() - start

    def measure(self, config: dict, repeats: int) -> dict:
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config["dtype"]]
        q = d = None
        try:
            loss_fn = self._loss(config)
            q = self._embeddings(config["size"], config["dim"], dtype)
            d = self._embeddings(_num_docs(config["size"], config["problem"]), config["dim"], dtype)
            guides = self._guides(config, config["size"], dtype)
            if self.on_gpu:
                baseline = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                first = self._step(loss_fn, q, d, guides)
                peak_extra = torch.cuda.max_memory_allocated() - baseline
            else:
                first, peak_extra = peak_extra_rss(lambda: self._step(loss_fn, q, d, guides))
            times = [self._step(loss_fn, q, d, guides) for _ in range(repeats)] or [first]
            forward = [self._forward(loss_fn, q, d, guides) for _ in range(max(repeats, 1))]
        except Exception as error:
            # One configuration failing (a kernel that does not compile for a shape, say)
            # leaves a reason in its row and the worker goes on to the next.
            if isinstance(error, MemoryError) or is_oom(error):
                result = {"status": "OOM"}
            else:
                first_line = (str(error).splitlines() or [""])[0][:100]
                result = {"status": f"error: {type(error).__name__}: {first_line}"}
        else:
            result = {
                "status": "ok",
                "seconds": statistics.median(times),
                "forward_seconds": statistics.median(forward),
                "peak_extra_bytes": peak_extra,
            }
        finally:
            # The inputs go before the cache is emptied, so that the next configuration
            # (or the retry after an OOM) starts from an empty device.
            q = d = guides = None
            if self.on_gpu:
                torch.cuda.empty_cache()
        return result


def _emit(record: dict) -> None:
    # One JSON line per result as soon as it exists, so a worker stopped at its timeout
    # still hands back what it measured.
    print(json.dumps(record), flush=True)


def _fit_search(runner: _Runner, fit: dict, known: dict | None) -> dict:
    """The largest B of ``fit`` (a configuration) that runs; ``known`` its measured row."""
    size = fit["size"]
    result = known or runner.measure(fit, repeats=0)
    while result["status"] == "OOM" and size > 1:
        size //= 2
        result = runner.measure(fit | {"size": size}, repeats=0)
    if result["status"] != "ok":
        return {"largest": None, "stop": f"{result['status']} down to B={size}"}
    while True:
        predicted = result["seconds"] * 4
        if 2 * size > fit["fit_max"]:
            stop = f"next B above --fit-max {fit['fit_max']}"
            break
        if predicted > fit["fit_seconds"]:
            stop = f"time: next step ~{predicted:.0f} s > {fit['fit_seconds']:.0f} s"
            break
        attempt = runner.measure(fit | {"size": 2 * size}, repeats=0)
        if attempt["status"] != "ok":
            stop = f"{attempt['status']} at B={2 * size}"
            break
        size, result = 2 * size, attempt
    return {
        "largest": size,
        "seconds": result["seconds"],
        "peak_extra_bytes": result["peak_extra_bytes"],
        "stop": stop,
    }


def _run_worker(job: dict) -> dict:
    runner = _Runner(job["impl"], job["device"], job["chunk_size"])
    measured = {}
    for index, config in enumerate(job["configs"]):
        measured[index] = runner.measure(config, job["repeats"])
        _emit({"index": index, **measured[index]})
    fit = job.get("fit")
    if fit is not None:
        known = next(
            (
                measured[i]
                for i, c in enumerate(job["configs"])
                if all(c[k] == fit[k] for k in ("size", "dim", "dtype", "problem", "variant"))
            ),
            None,
        )
        _emit({"fit": _fit_search(runner, fit, known)})
    return {"done": True}


# ------------------------------------------------------------------------------------------
# Driver: spawn workers, build the tables.
# ------------------------------------------------------------------------------------------


def _skipped_impls(impls: list[str], device: str) -> dict[str, str]:
    """Why each implementation that cannot run here is left out."""
    reasons = {}
    for impl in impls:
        if impl == "inf_cl" and importlib.util.find_spec("inf_cl") is None:
            reasons[impl] = "not installed (`pip install inf-cl`)"
        elif impl == "inf_cl" and device != "cuda":
            reasons[impl] = "needs CUDA"
        elif (
            impl.startswith("triton")
            and device != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"
        ):
            reasons[impl] = "needs CUDA or TRITON_INTERPRET=1"
    return reasons


def _run_job(
    job: dict, timeout: float, warmups: list[tuple] | None = None
) -> tuple[dict[int, dict], dict | None, str | None]:
    """Run one worker; (results by config index, fit result, why it stopped early). The
    first calls it timed are appended to ``warmups`` as (impl, dim, dtype, problem,
    variant, seconds)."""
    warmups = [] if warmups is None else warmups
    known = len(warmups)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    problem = None
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, code = completed.stdout, completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        # TimeoutExpired keeps bytes whatever `text` asked for.
        raw = expired.stdout or b""
        stdout, stderr, code = raw.decode() if isinstance(raw, bytes) else raw, "", None
        problem = f"timeout after {timeout:.0f} s"
    results, fit = {}, None
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "index" in record:
            results[record.pop("index")] = record
        elif "fit" in record:
            fit = record["fit"]
        elif "warmup" in record:
            warmups.append((job["impl"], *record["warmup"]))
    if problem is not None and len(warmups) == known:
        # Stopped before its first call ended: compiling (torch.compile, Triton), most likely.
        problem += " in its first call"
    if code == -9:
        # SIGKILL during a big allocation is the Linux OOM killer.
        problem = "OOM"
    elif code not in (0, None):
        last_line = (stderr.strip().splitlines() or ["?"])[-1]
        problem = f"error: {last_line[:100]}"
    return results, fit, problem


def _flops(config: dict) -> float:
    batch, dim = config["size"], config["dim"]
    flops = 8 * batch * _num_docs(batch, config["problem"]) * dim
    if config["problem"] == "symmetric":
        flops += 8 * batch * batch * dim
    return flops


def _columns(on_gpu: bool, peak: float | None) -> list[str]:
    columns = ["impl", "problem", "variant", "B", "N", "D", "dtype", "fwd+bwd ms", "fwd ms"]
    columns += ["time / naive", "time / plain"]
    columns += ["peak extra MiB", "naive mem / mem"]
    if on_gpu:
        columns.append("TFLOP/s")
        if peak:
            columns.append("% of bf16 peak")
    return columns


def _format_row(
    config: dict, result: dict, naive: dict | None, plain: dict | None, columns: list[str]
) -> str:
    """One table row; ``naive`` is the naive loss's result for the same configuration and
    ``plain`` this implementation's without loss options (None where not measured)."""
    size = config["size"]
    cells = [config["impl"], config["problem"], config["variant"], str(size)]
    cells += [str(_num_docs(size, config["problem"])), str(config["dim"]), config["dtype"]]
    if result["status"] != "ok":
        cells.append(result["status"].replace("|", "/"))
        cells += ["–"] * (len(columns) - len(cells))
        return "| " + " | ".join(cells) + " |"
    seconds, peak_extra = result["seconds"], result["peak_extra_bytes"]
    naive_ok = naive is not None and naive["status"] == "ok"
    plain_ok = plain is not None and plain["status"] == "ok"
    cells += [
        f"{seconds * 1e3:.1f}",
        f"{result['forward_seconds'] * 1e3:.1f}",
        f"{seconds / naive['seconds']:.2f}×" if naive_ok else "–",
        f"{seconds / plain['seconds']:.2f}×" if plain_ok else "–",
        f"{peak_extra / MIB:.1f}",
        # Under a MiB the ratio measures allocator noise, not the loss.
        f"{naive['peak_extra_bytes'] / peak_extra:.1f}×"
        if naive_ok and min(peak_extra, naive["peak_extra_bytes"]) >= MIB
        else "–",
    ]
    if "TFLOP/s" in columns:
        tflops = _flops(config) / seconds / 1e12
        cells.append(f"{tflops:.1f}")
        if "% of bf16 peak" in columns:
            cells.append(f"{100 * tflops / config['peak']:.0f}%")
    return "| " + " | ".join(cells) + " |"


def _table(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _grid(args: argparse.Namespace) -> list[dict]:
    """Every configuration but the implementation, in table order."""
    return [
        {"problem": problem, "variant": variant, "dtype": dtype, "dim": dim, "size": size}
        for problem in args.problems
        for variant in args.variants
        for dtype in args.dtypes
        for dim in args.dims
        for size in args.sizes
    ]


def _jobs(args: argparse.Namespace, impls: list[str], device: str, isolate: str) -> list[dict]:
    """Worker jobs: each a list of configurations of one implementation, in table order."""
    grid = _grid(args)
    common_fields = {"device": device, "chunk_size": args.chunk_size, "repeats": args.repeats}
    jobs = []
    for impl in impls:
        configs = [config | {"impl": impl} for config in grid]
        if isolate == "config":
            jobs += [{"impl": impl, "configs": [c], **common_fields} for c in configs]
        else:
            jobs.append({"impl": impl, "configs": configs, **common_fields})
    if args.fit_search:
        fit = {
            "problem": args.problems[0],
            "variant": args.variants[0],
            "dtype": args.dtypes[0],
            "dim": max(args.dims),
            "size": max(args.sizes),
            "fit_seconds": args.fit_seconds,
            "fit_max": args.fit_max,
        }
        # The search rides on the job that measures its starting configuration.
        for impl in impls:
            owner = next(
                job
                for job in jobs
                if job["impl"] == impl
                and any(all(c[k] == fit[k] for k in fit if k in c) for c in job["configs"])
            )
            owner["fit"] = fit | {"impl": impl}
    return jobs


def _run_driver(args: argparse.Namespace) -> str:
    device = _resolve_device(args.device)
    if args.ceilings:
        facts = measure_ceilings(device, args.ceiling_size)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(facts, indent=2) + "\n")
        report = _ceilings_report(facts)
        print(report, flush=True)
        return report

    started = time.monotonic()
    on_gpu = device == "cuda"
    skipped = _skipped_impls(args.impls, device)
    impls = [impl for impl in args.impls if impl not in skipped]
    # naive first, so the other impls' ratios refer to a measurement from the same run.
    impls.sort(key=lambda impl: impl != "naive")
    isolate = args.isolate if args.isolate != "auto" else ("impl" if on_gpu else "config")
    # Other processes on the machine skew the timings; the header records how busy it was.
    load_at_start = os.getloadavg()[0]
    columns = _columns(on_gpu, args.peak_tflops)
    print("\n".join(_table(columns)), flush=True)
    results: dict[tuple, dict] = {}
    fits: dict[str, dict] = {}
    warmups: list[tuple] = []
    for job in _jobs(args, impls, device, isolate):
        timeout = args.timeout
        if args.budget is not None:
            timeout = min(timeout, args.budget - (time.monotonic() - started))
        if timeout <= 0:
            found, fit, problem = {}, None, "skipped: time budget spent"
        else:
            found, fit, problem = _run_job(job, timeout, warmups)
        for index, config in enumerate(job["configs"]):
            results[_key(config)] = found.get(index) or {"status": problem or "no result"}
            print(_row(config, results, args.peak_tflops, columns), flush=True)
        if "fit" in job:
            fits[job["impl"]] = fit or {"largest": None, "stop": problem or "no result"}

    rows = _table(columns)
    for config in _grid(args):
        for impl in impls:
            rows.append(_row(config | {"impl": impl}, results, args.peak_tflops, columns))
    notes = [
        f"fwd+bwd ms: median of {args.repeats} runs after a first run that measures memory;"
        f"; fwd ms: median of as many forward-only runs without autograd;"
        f" temperature {TEMPERATURE}, chunk_size={args.chunk_size} (torch's tile,"
        f" triton's backward column chunk),"
        f" one process per {isolate}",
        *(f"{impl}: skipped: {reason}" for impl, reason in skipped.items()),
        _warmup_note(warmups),
    ]
    if on_gpu:
        notes.append("TFLOP/s counts 8·B·N·D per direction of the problem, not the variant's")
    if args.peak_tflops:
        notes.append(f"bf16 matmul peak measured on this device: {_num(args.peak_tflops)} TFLOP/s")
    header = report_header("InfoNCE benchmark", device, load_at_start, notes)
    report = header + rows
    if args.fit_search:
        fit_rows = ["", *_fit_table(args, fits)]
        print("\n".join(fit_rows), flush=True)
        report += fit_rows
    text = "\n".join(report) + "\n"
    if args.summary:
        args.summary.write_text(_summary(args, impls, skipped, results, warmups) + "\n")
    return text


def _warmup_note(warmups: list[tuple]) -> str:
    """The first call of each (implementation, setting), where compilation happens."""
    if not warmups:
        return "first calls (64 rows: kernel loading, compilation): none finished"
    parts = [
        f"{impl} {problem} D={dim} {dtype}{'' if variant == 'plain' else ' ' + variant}"
        f" {seconds:.1f} s"
        for impl, dim, dtype, problem, variant, seconds in warmups
    ]
    return "first calls (64 rows: kernel loading, compilation): " + ", ".join(parts)


def _row(config: dict, results: dict, peak: float | None, columns: list[str]) -> str:
    naive = results.get(_key(config | {"impl": "naive"}))
    plain = (
        results.get(_key(config | {"variant": "plain"})) if config["variant"] != "plain" else None
    )
    return _format_row(config | {"peak": peak}, results[_key(config)], naive, plain, columns)


def _key(config: dict) -> tuple:
    return tuple(config[k] for k in ("impl", "problem", "variant", "dtype", "dim", "size"))


def _fit_table(args: argparse.Namespace, fits: dict[str, dict]) -> list[str]:
    setting = f"{args.problems[0]}, {args.dtypes[0]}, D={max(args.dims)}"
    rows = [
        f"Largest B that ran ({setting}; doubling from B={max(args.sizes)}, one step each,"
        f" a step predicted over {args.fit_seconds:.0f} s is not tried):",
        "",
        *_table(["impl", "largest B", "fwd+bwd ms there", "peak extra MiB there", "stopped by"]),
    ]
    for impl, fit in fits.items():
        if fit["largest"] is None:
            rows.append(f"| {impl} | – | – | – | {fit['stop']} |")
            continue
        rows.append(
            f"| {impl} | {fit['largest']} | {fit['seconds'] * 1e3:.1f} |"
            f" {fit['peak_extra_bytes'] / MIB:.1f} | {fit['stop']} |"
        )
    return rows


def _target_config(args) -> dict:
    """The setting the summary's headline is about: B = N (in_batch where measured), the
    widest D, bf16 where measured."""
    return {
        "problem": "in_batch" if "in_batch" in args.problems else args.problems[0],
        "variant": "plain",
        "dtype": "bf16" if "bf16" in args.dtypes else args.dtypes[0],
        "dim": max(args.dims),
        "size": args.target_size or min(args.sizes),
    }


def _num(value: float) -> str:
    """One decimal, or two significant digits below 1 (CPU rehearsals' tiny rates)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _target_line(args, results: dict) -> str | None:
    """The fused kernel's fwd+bwd at the target setting as a share of the matmul peak,
    against --target-percent; None where the fused kernel was not asked for."""
    if "triton" not in args.impls:
        return None
    config = _target_config(args)
    setting = (
        f"B={config['size']} N={_num_docs(config['size'], config['problem'])}"
        f" D={config['dim']} {config['dtype']} {config['problem']}"
    )
    result = results.get(_key(config | {"impl": "triton"}))
    if result is None:
        return f"fused fwd+bwd {setting}: not in the grid (--sizes)"
    if result["status"] != "ok":
        return f"fused fwd+bwd {setting}: {result['status']}"
    tflops = _flops(config) / result["seconds"] / 1e12
    line = f"fused fwd+bwd {setting}: {result['seconds'] * 1e3:.2f} ms, {_num(tflops)} TFLOP/s"
    if not args.peak_tflops:
        return line + ", no --peak-tflops to compare with"
    percent = 100 * tflops / args.peak_tflops
    verdict = "met" if percent >= args.target_percent else "missed"
    return (
        f"{line} = {_num(percent)}% of the measured bf16 matmul {_num(args.peak_tflops)}"
        " TFLOP/s"
        f" (target ≥ {args.target_percent:.0f}%: {verdict})"
    )


def _summary(
    args, impls: list[str], skipped: dict[str, str], results: dict, warmups: list[tuple]
) -> str:
    """The fused kernel against its target, then each implementation's time at the
    largest size of the first setting (and its first call where that was compilation)."""
    config = {
        "problem": args.problems[0],
        "variant": args.variants[0],
        "dtype": args.dtypes[0],
        "dim": max(args.dims),
        "size": max(args.sizes),
    }
    compile_seconds: dict[str, float] = {}
    for impl, *_, seconds in warmups:
        if impl == "compiled":
            compile_seconds.setdefault(impl, seconds)
    parts = []
    for impl in impls:
        result = results[_key(config | {"impl": impl})]
        part = (
            f"{impl} {result['seconds'] * 1e3:.1f} ms"
            if result["status"] == "ok"
            else f"{impl} {result['status']}"
        )
        if impl in compile_seconds:
            part += f" (compiled in {compile_seconds[impl]:.0f} s)"
        parts.append(part)
    parts += [f"{impl} skipped" for impl in skipped]
    setting = f"B={config['size']} D={config['dim']} {config['dtype']} {config['problem']}"
    line = f"{setting}: " + ", ".join(parts)
    target = _target_line(args, results)
    return f"{target}; {line}" if target else line


def main(argv: list[str] | None = None) -> None:
    common.main(_parse_args(argv), _run_worker, _run_driver)


if __name__ == "__main__":
    main()
