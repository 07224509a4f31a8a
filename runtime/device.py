"""Where and how tensors are computed: the device a process runs on, whether it does bf16
at speed, and the precision of fp32 matrix products. The lowest layer: every other one may
import it, it imports none of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device named by ``name`` (auto, cpu, cuda, cuda:N, or any torch device for a
    single process) for the process with ``local_rank``.

    Distributed, each process needs a GPU of its own, so ``auto`` and ``cuda`` mean
    ``cuda:(local_rank % visible GPUs)``: the local rank when each process sees every GPU
    of its node, 0 when the launcher binds one GPU to each task. An explicit ``cuda:N``
    would put every rank on the same GPU and is refused, identically on every rank, so
    that no rank is left waiting for one that stopped. Only cpu (Gloo) and cuda (NCCL) can
    run distributed.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} but CUDA is not available; use device=cpu or auto")
    if not distributed:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"device: {name!r} names one GPU for every process; with several processes "
                "use device=cuda or auto, which gives each process the GPU of its local rank"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type != "cpu":
        raise ValueError(f"device: {name!r} cannot run distributed; use cpu (Gloo) or cuda (NCCL)")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether torch can run bfloat16 matrix products on ``device`` at speed."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores (CUDA only: torch's CPU matmuls ignore it) while
    the block runs; the process's setting is put back afterwards."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
