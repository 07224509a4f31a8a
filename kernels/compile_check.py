"""Ahead-of-time compilation of every InfoNCE kernel variant for a GPU, without a GPU.

The Triton interpreter runs the kernels as Python and never calls Triton's code generator,
so type errors that only the compiler sees, shared-memory overflows and register spills go
unnoticed on a CPU machine. This module compiles each variant down to a cubin for Hopper
(sm_90a) with ``triton.compile`` and the ptxas bundled with Triton, and reports what a GPU
launch would get: shared memory, registers and spills (ptxas -v), and whether the tile
products use Hopper's wgmma tensor-core instructions::

    python -m biencoder.kernels.compile_check            # with doc ids only, a Markdown table
    python -m biencoder.kernels.compile_check --all --json

Besides the plain loss (one direction, no guide, no hardness) it compiles the
specialisations of the other directions, the guide filter and the hardness modes
(:data:`FEATURES`): bf16 in the fast subset, every dtype with ``--all``.

It must run in a process without ``TRITON_INTERPRET``: the kernels in
:mod:`kernels.infonce` are decorated once, at import, as either interpreted or compiled
functions, and only the latter can be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

from biencoder.kernels import infonce, infonce_launch
from biencoder.kernels.infonce_options import HARDNESS_CODES

HOPPER = GPUTarget("cuda", 90, 32)
# Opt-in dynamic shared memory per block on sm_90 (227 KiB); a kernel that needs more
# compiles but fails at launch with OutOfResources.
HOPPER_MAX_SHARED_BYTES = 232_448
DIMS = (384, 768)
DTYPES = {
    "fp32-ieee": (torch.float32, "ieee"),
    "fp32-tf32": (torch.float32, "tf32"),
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Pointers to int64 tensors when their flag is on; every other pointer the host passes is
# fp32 (the inputs take their dtype), including the placeholders for unused pointers.
_INT64_POINTERS = {
    "doc_ids_ptr": lambda flags: flags.get("HAS_DOC_IDS"),
    "best_other_index_ptr": lambda flags: flags.get("WITH_STATS"),
    "false_negatives_ptr": lambda flags: flags.get("WITH_STATS"),
    # Read for doc_to_doc's exclusions and the owner-based hardness modes.
    "owners_ptr": lambda flags: (
        flags.get("EXCLUDE_OWN")
        or flags.get("HARDNESS")
        in (HARDNESS_CODES["in_batch_negatives"], HARDNESS_CODES["hard_negatives"])
    ),
}
# The guide embeddings, cast to the inputs' dtype by the host.
_INPUT_POINTERS = ("q_ptr", "d_ptr", "guide_q_ptr", "guide_d_ptr", "probs_ptr")
# Per-direction constexprs of kernels.infonce (see its Math comment). "plain" is the loss
# without options; the others are the specialisations the options launch. Each names the
# kernel flag values that apply: WITH_STATS only on query_to_doc's forward.
_PLAIN = {"DIAGONAL": 0, "EXCLUDE_OWN": False, "HARDNESS": 0, "HAS_GUIDE": False}
FEATURES: dict[str, dict[str, object]] = {
    "plain": _PLAIN,
    "q2q": _PLAIN | {"DIAGONAL": 2},
    "d2q-joint": _PLAIN | {"DIAGONAL": 1},
    "d2d": _PLAIN | {"DIAGONAL": 2, "EXCLUDE_OWN": True},
    "hard-in-batch": _PLAIN | {"HARDNESS": 1},
    "hard-own": _PLAIN | {"HARDNESS": 2},
    "hard-all": _PLAIN | {"HARDNESS": 3},
    "guide": _PLAIN | {"HAS_GUIDE": True},
    "q2d-guide-hard": _PLAIN | {"HARDNESS": 1, "HAS_GUIDE": True},
    "d2d-guide": _PLAIN | {"DIAGONAL": 2, "EXCLUDE_OWN": True, "HAS_GUIDE": True},
}
# The fast subset: the heaviest combinations (most registers) and the diagonal kinds.
FAST_FEATURES = ("q2d-guide-hard", "d2q-joint", "d2d-guide")
FAST_FEATURE_DTYPE = "bf16"
_KERNELS = {
    "fwd": (infonce.infonce_fwd_kernel, "WITH_STATS"),
    "bwd_dq": (infonce.infonce_bwd_dq_kernel, "ATOMIC_DD"),
    "bwd_dd": (infonce.infonce_bwd_dd_kernel, None),
    "bwd_probs": (infonce.infonce_bwd_probs_kernel, None),
}


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: a kernel, a dtype, its flags and the dims sharing it."""

    kernel: str
    dtype: str
    has_doc_ids: bool
    flag: str | None
    flag_value: bool
    dims: tuple[int, ...]
    blocks: infonce_launch.BlockSizes
    feature: str = "plain"

    @property
    def name(self) -> str:
        flag = f" {self.flag}={int(self.flag_value)}" if self.flag else ""
        feature = f" {self.feature}" if self.feature != "plain" else ""
        return f"{self.kernel} {self.dtype}{feature} HAS_DOC_IDS={int(self.has_doc_ids)}{flag}"


@dataclass(frozen=True)
class CompileResult:
    variant: str
    dims: tuple[int, ...]
    blocks: str
    seconds: float
    error: str | None = None
    error_summary: str | None = None
    shared_bytes: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    mma: str | None = None


def variants(dims: tuple[int, ...] = DIMS, fast: bool = False) -> list[Variant]:
    """Every variant for embedding dims ``dims``; dims whose default block sizes agree
    share one compilation, since D is a runtime argument.

    ``fast`` keeps, per kernel and dtype, the plain variants with doc ids (training always
    passes them) and its flag both off and on: the flags pick code paths of different
    register pressure (atomic dd, the statistics), so both are compiled; and of the
    option features only :data:`FAST_FEATURES` in bf16.
    """
    result = []
    for kernel, (_, flag) in _KERNELS.items():
        for dtype_name, (dtype, _) in DTYPES.items():
            doc_id_options = (True,) if fast else (False, True)
            features = list(FEATURES) if not fast else ["plain"]
            if fast and dtype_name == FAST_FEATURE_DTYPE:
                features += FAST_FEATURES
            for feature in features:
                values = FEATURES[feature]
                extra_state = bool(values["HAS_GUIDE"] or values["HARDNESS"])
                flag_options = (False,) if flag is None else (False, True)
                if flag == "WITH_STATS" and not _is_query_to_doc(feature):
                    flag_options = (False,)
                for flag_on in flag_options:
                    by_blocks: dict[infonce_launch.BlockSizes, list[int]] = {}
                    for dim in dims:
                        blocks = _block_sizes(kernel, dim, dtype, extra_state, flag_on)
                        by_blocks.setdefault(blocks, []).append(dim)
                    result += [
                        Variant(
                            kernel,
                            dtype_name,
                            has_ids,
                            flag,
                            flag_on,
                            tuple(shared_dims),
                            blocks,
                            feature,
                        )
                        for blocks, shared_dims in by_blocks.items()
                        for has_ids in doc_id_options
                    ]
    return result


def _block_sizes(
    kernel: str, dim: int, dtype: torch.dtype, extra_state: bool, flag_on: bool
) -> infonce_launch.BlockSizes:
    """The tiles a launch of ``kernel`` gets by default: the forward's depend on whether it
    takes the statistics, the "gemm" backward's probability kernel has its own."""
    if kernel == "fwd":
        return infonce_launch.default_forward_block_sizes(
            dim, dtype, extra_state, with_stats=flag_on
        )
    if kernel == "bwd_probs":
        return infonce_launch.default_probs_block_sizes(dim, dtype, extra_state)
    return infonce_launch.default_block_sizes(dim, dtype, extra_state)


def _is_query_to_doc(feature: str) -> bool:
    """Whether the feature is a specialisation of query_to_doc, the direction whose forward
    launch takes the statistics."""
    values = FEATURES[feature]
    return values["DIAGONAL"] == 0 and not values["EXCLUDE_OWN"]


def _constexprs(variant: Variant) -> dict[str, object]:
    dtype, precision = DTYPES[variant.dtype]
    blocks = variant.blocks
    values: dict[str, object] = {
        "BLOCK_M": blocks.m,
        "BLOCK_N": blocks.n,
        "BLOCK_D": blocks.d,
        "BLOCK_DOUT": blocks.d_out,
        "HAS_DOC_IDS": variant.has_doc_ids,
        **FEATURES[variant.feature],
        **infonce_launch.kernel_flags(dtype),
    }
    if precision is not None:
        values["INPUT_PRECISION"] = precision
    if variant.flag is not None:
        values[variant.flag] = variant.flag_value
    fn = _KERNELS[variant.kernel][0]
    return {name: value for name, value in values.items() if name in fn.arg_names}


def _source(variant: Variant) -> triton.compiler.ASTSource:
    """The ASTSource a launch with contiguous [*, D] inputs, D in ``variant.dims``, makes."""
    fn = _KERNELS[variant.kernel][0]
    constexprs = _constexprs(variant)
    input_type = _POINTER_TYPES[DTYPES[variant.dtype][0]]
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            int64_flag = _INT64_POINTERS.get(name)
            if name in _INPUT_POINTERS:
                signature[name] = input_type
            elif int64_flag is not None and int64_flag(constexprs):
                signature[name] = "*i64"
            else:
                signature[name] = "*fp32"
            # Torch allocations are 16-byte aligned, as the launcher would specialise.
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "hardness_strength":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # D, G and the row strides (D or G for contiguous rows) are multiples of 16 for
            # the dims checked here (guide dims like the model's); B and N are left general.
            if name in ("D", "G") or name.startswith("stride"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(log: str) -> dict[str, int]:
    usage = {}
    if registers := re.search(r"Used (\d+) registers", log):
        usage["registers"] = int(registers.group(1))
    if spills := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        usage["spill_stores"], usage["spill_loads"] = map(int, spills.groups())
    return usage


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def compile_variant(variant: Variant, target: GPUTarget = HOPPER) -> CompileResult:
    """Compiles one variant to a cubin; a compiler error is reported, not raised."""
    blocks = variant.blocks
    common = {
        "variant": variant.name,
        "dims": variant.dims,
        "blocks": (
            f"{blocks.m}x{blocks.n}x{blocks.d}/{blocks.d_out} "
            f"w{blocks.num_warps} s{blocks.num_stages}"
        ),
    }
    start = time.perf_counter()
    # ptxas' -v report is printed, not returned, when dump_ptxas_log is on.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                _source(variant),
                target=target,
                options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
            )
    except Exception as error:
        # A CompilationError's text is the kernel excerpt; the reason is in its cause chain.
        chain = []
        while error is not None:
            chain.append(f"{type(error).__name__}: {error}".strip())
            error = error.__cause__
        return CompileResult(
            **common,
            seconds=time.perf_counter() - start,
            error="\n".join(reversed(chain)),
            error_summary=chain[-1].splitlines()[-1],
        )
    return CompileResult(
        **common,
        seconds=time.perf_counter() - start,
        shared_bytes=compiled.metadata.shared,
        mma=_mma_kind(compiled.asm["ptx"]),
        **_ptxas_usage(log.getvalue()),
    )


def unavailable_reason(target: GPUTarget = HOPPER) -> str | None:
    """Why compiling for ``target`` cannot work in this process, or None."""
    if infonce.INTERPRETED:
        return "biencoder.kernels.infonce was imported with TRITON_INTERPRET set; run without it"
    if not any(b.compiler.supports_target(target) for b in triton.backends.backends.values()):
        return f"this Triton build has no backend for {target}"
    # Imported here because it exists only when the NVIDIA backend does.
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(target.arch)
    except RuntimeError as error:
        return f"Triton's bundled ptxas does not run here: {error}"
    return None


def format_table(results: list[CompileResult]) -> str:
    """A Markdown table, one row per compiled variant."""
    lines = [
        "| variant | D | blocks m×n×d/d_out w s | shared B | regs | spills st/ld | mma | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        dims = ",".join(map(str, result.dims))
        if result.error is not None:
            failure = f"FAILED: {result.error_summary}"
            lines.append(f"| {result.variant} | {dims} | {result.blocks} | {failure} |")
            continue
        spills = (
            f"{result.spill_stores}/{result.spill_loads}" if result.spill_stores is not None else ""
        )
        registers = result.registers if result.registers is not None else ""
        lines.append(
            f"| {result.variant} | {dims} | {result.blocks} | {result.shared_bytes} "
            f"| {registers} | {spills} | {result.mma} | {result.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every variant, not the fast subset")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason is not None:
        print(json.dumps({"unavailable": reason}) if args.json else reason)
        return 0 if args.json else 1
    # A fresh cache, so that every variant really runs ptxas and reports its usage.
    with tempfile.TemporaryDirectory() as cache_dir, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache_dir
        knobs.nvidia.dump_ptxas_log = True
        results = [compile_variant(variant) for variant in variants(fast=not args.all)]
    table = format_table(results)
    if args.json:
        print(json.dumps({"results": [asdict(result) for result in results], "table": table}))
    else:
        print(table)
    return 0 if all(result.error is None for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
