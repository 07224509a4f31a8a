"""Data-parallel training primitives: this process's place in the job, the launcher's
environment, small collectives for metrics, and an all-gather that carries gradients.

One process per device runs the same model on its own slice of every batch, and
DistributedDataParallel averages the parameter gradients over the ``W`` ranks. For a loss
that is a sum of per-example terms that is the whole story. A contrastive loss is not: each
query is scored against every document of the batch, so the in-batch negatives of rank
``r`` include the documents embedded on every other rank. :func:`gather` all-gathers the
embeddings so that each rank can score its rows against the global batch.

Why the gather must carry gradients, and why they are summed over ranks. The objective is
``L = (1/W) Σ_r L_r``, where ``L_r`` is the loss rank ``r`` computes from its own rows and
the gathered rows of all ranks. Rank ``r``'s embeddings ``x_r`` enter every ``L_s``, so

    dL/dx_r = (1/W) Σ_s dL_s/dx_r,

and the term ``dL_s/dx_r`` is only known on rank ``s``, which computed ``L_s``. A plain
all-gather (no gradient) silently drops every ``s != r`` term: the gradient is then wrong,
not merely noisier. :func:`gather`'s backward therefore sums the gradient of the gathered
tensor over ranks and hands each rank the rows it contributed, ``Σ_s dL_s/dx_r``. Rank
``r`` backpropagates that into its parameters, DDP divides the sum over ranks by ``W``,
and the result is exactly the single-process gradient of ``L``. With unequal row counts
per rank, ``L`` stays the mean of the per-rank losses, which is the mean over all rows only
when every rank holds the same number.

The gather is a collective in both directions: every rank must call it in the same order,
and every rank must backpropagate through its result, or the others wait forever.

Launchers. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` for each worker. A SLURM job that starts one process per task (``srun``,
hydra-submitit-launcher) sets only ``SLURM_*`` variables; :func:`launch_from_env` derives
the same five values from them, parsing the compressed node list itself because
``scontrol`` is not always installed where the job runs.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch.autograd.function import once_differentiable

from biencoder.runtime.device import resolve_device

_REDUCE_OPS = {
    "sum": tdist.ReduceOp.SUM,
    "max": tdist.ReduceOp.MAX,
    "min": tdist.ReduceOp.MIN,
    # Gloo has no AVG: the mean is a sum divided by the world size.
    "mean": tdist.ReduceOp.SUM,
}

# torch.device is immutable, so one instance can be every Distributed's default.
_CPU = torch.device("cpu")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A port derived from the job id, so that every task of a job agrees on it without talking,
# and two jobs sharing a node rarely collide.
_SLURM_BASE_PORT = 20000
_SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world_size, local_rank, device. world_size 1 =
    a single process (no process group), where every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_object: src {src} is not a rank of {self.world_size}")
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather_rows(self, values: torch.Tensor) -> list[list[float]]:
        """Every rank's ``values`` (a 1-d tensor, the same length on every rank, on this
        rank's device), read to the host in one transfer: row r is rank r's."""
        if not self.enabled:
            return [values.tolist()]
        rows = [torch.empty_like(values) for _ in range(self.world_size)]
        tdist.all_gather(rows, values)
        return torch.stack(rows).tolist()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average of each value over ranks; every rank must pass the same keys."""
        return self.reduce(values, "mean")

    def reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        """Each value reduced over ranks by ``op`` (sum, max, min or mean), on every rank.

        Every rank must pass the same keys, in any order. That is checked (one small object
        gather) because packing different keys into one tensor would silently mix unrelated
        metrics, or hang when the counts differ.
        """
        if op not in _REDUCE_OPS:
            raise ValueError(f"reduce: op {op!r} is not one of {sorted(_REDUCE_OPS)}")
        if not self.enabled:
            return {key: float(value) for key, value in values.items()}
        keys = sorted(values)
        all_keys = self.all_gather_objects(keys)
        if any(other != keys for other in all_keys):
            listed = "; ".join(f"rank {r}: {k}" for r, k in enumerate(all_keys))
            raise ValueError(f"reduce: ranks hold different keys ({listed})")
        # float64 so that sums of many losses or counts lose nothing to rounding.
        packed = torch.tensor(
            [float(values[key]) for key in keys], dtype=torch.float64, device=self.device
        )
        tdist.all_reduce(packed, op=_REDUCE_OPS[op])
        if op == "mean":
            packed /= self.world_size
        reduced = dict(zip(keys, packed.tolist(), strict=True))
        return {key: reduced[key] for key in values}

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Replace each gradient by its mean over ranks, as DDP does for the parameters it
        wraps: for parameters outside it, such as a loss's learnable temperature."""
        if not self.enabled:
            return
        for parameter in parameters:
            if parameter.grad is not None:
                tdist.all_reduce(parameter.grad)
                parameter.grad /= self.world_size

    def shard(self, count: int) -> slice:
        """The contiguous slice of ``range(count)`` this rank owns; every rank owns as many."""
        if count < 0:
            raise ValueError(f"shard: count {count} is negative")
        if count % self.world_size:
            raise ValueError(
                f"shard: {count} items do not split evenly over world size {self.world_size}; "
                f"use a multiple of {self.world_size}"
            )
        per_rank = count // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


# ---------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Launch:
    """What a multi-process launcher told this process: its rank and where to meet."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Literal["torchrun", "slurm"]

    @property
    def init_method(self) -> str:
        # torchrun's workers must rendezvous through env://: with TORCHELASTIC_USE_AGENT_STORE
        # the agent already serves the store on MASTER_PORT, and a tcp:// server there clashes.
        if self.launcher == "torchrun":
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"


def parse_nodelist(nodelist: str) -> list[str]:
    """The hosts of a SLURM compressed node list, in order.

    ``gpu[01-02,07]`` is ``gpu01, gpu02, gpu07`` (a range keeps the zero padding of its
    lower bound), ``a1,b[2-3]`` is ``a1, b2, b3``, and a name with several bracket groups,
    ``r[1-2]-n[1-2]``, is their product with the last group varying fastest.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item, nodelist))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"node list {nodelist!r}: unbalanced or nested brackets")
    if depth:
        raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    if any(not item for item in items):
        raise ValueError(f"node list {nodelist!r}: empty host name")
    return items


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _expand_host(item: str, nodelist: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        if "]" in item:
            raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    suffixes = _expand_host(rest, nodelist) if rest else [""]
    hosts = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"node list {nodelist!r}: {part!r} is not a number or a range")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"node list {nodelist!r}: range {part!r} runs backwards")
        for number in range(int(low), int(high) + 1):
            hosts.extend(f"{prefix}{number:0{len(low)}d}{suffix}" for suffix in suffixes)
    return hosts


def _require(env: Mapping[str, str], names: tuple[str, ...], launcher: str) -> None:
    missing = [name for name in names if name not in env]
    if missing:
        raise ValueError(f"{launcher} environment without {', '.join(missing)}")


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def launch_from_env(env: Mapping[str, str]) -> Launch | None:
    """The multi-process launch described by ``env``, or None for a single process.

    torchrun's variables take precedence over SLURM's, so that ``torchrun`` inside a SLURM
    allocation is one torchrun job. Without torchrun, a SLURM task (``SLURM_PROCID`` and
    ``SLURM_NTASKS`` set) is rank ``SLURM_PROCID`` of ``SLURM_NTASKS``; the master is the
    first host of the step's node list (``SLURM_STEP_NODELIST``, else
    ``SLURM_JOB_NODELIST``), where task 0 runs, and the port is ``MASTER_PORT`` if set, else
    ``20000 + SLURM_JOB_ID % 20000``. A world size of 1 is a single process.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        _require(env, ("RANK", "WORLD_SIZE"), "torchrun")
        if _int_var(env, "WORLD_SIZE") == 1:
            return None
        _require(env, _TORCHRUN_VARS, "torchrun")
        launch = Launch(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_var(env, "MASTER_PORT"),
            launcher="torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if _int_var(env, "SLURM_NTASKS") == 1:
            return None
        # A step may run on part of the job's nodes; task 0 runs on the step's first.
        step = "SLURM_STEP_NODELIST" in env
        nodelist_var = "SLURM_STEP_NODELIST" if step else "SLURM_JOB_NODELIST"
        port_var = "MASTER_PORT" if "MASTER_PORT" in env else "SLURM_JOB_ID"
        _require(env, ("SLURM_LOCALID", nodelist_var, port_var), "SLURM")
        port = _int_var(env, port_var)
        if port_var == "SLURM_JOB_ID":
            port = _SLURM_BASE_PORT + port % _SLURM_PORT_SPAN
        launch = Launch(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS"),
            local_rank=_int_var(env, "SLURM_LOCALID"),
            master_addr=parse_nodelist(env[nodelist_var])[0],
            master_port=port,
            launcher="slurm",
        )
    else:
        return None
    if not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ValueError(
            f"{launch.launcher}: rank {launch.rank} (local {launch.local_rank}) "
            f"is not a rank of world size {launch.world_size}"
        )
    return launch


# ---------------------------------------------------------------------------- setup


def init_distributed(device: str = "auto") -> Distributed:
    """This process's :class:`Distributed`, after joining the default process group.

    The launch comes from the environment (:func:`launch_from_env`); without one, or with
    a world size of 1, no group is created. A group that is already initialised (a test, or
    a caller that set one up itself) is reused: rank and world size are the group's, the
    local rank is the launcher's, else the rank (one node). The backend is NCCL for a CUDA
    device and Gloo for the CPU.
    """
    if tdist.is_available() and tdist.is_initialized():
        rank, world_size = tdist.get_rank(), tdist.get_world_size()
        launch = launch_from_env(os.environ)
        local_rank = launch.local_rank if launch is not None else rank
        resolved = resolve_device(device, local_rank, distributed=world_size > 1)
        if resolved.type == "cuda" and world_size > 1:
            torch.cuda.set_device(resolved)
        return Distributed(rank, world_size, local_rank, resolved)
    launch = launch_from_env(os.environ)
    if launch is None:
        return Distributed(device=resolve_device(device))
    resolved = resolve_device(device, launch.local_rank, distributed=True)
    if resolved.type == "cuda":
        # Before the group exists, so that NCCL's communicator and every later
        # `torch.cuda.current_device()` refer to this rank's GPU, not GPU 0.
        torch.cuda.set_device(resolved)
    tdist.init_process_group(
        backend="nccl" if resolved.type == "cuda" else "gloo",
        init_method=launch.init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        device_id=resolved if resolved.type == "cuda" else None,
    )
    return Distributed(launch.rank, launch.world_size, launch.local_rank, resolved)


def shutdown(dist: Distributed) -> None:
    """Leaves the default process group, if this process is in one."""
    if dist.enabled and tdist.is_initialized():
        # A DDP wrapper lives in a reference cycle: left to the collector at interpreter
        # exit, it outlives the group and its reducer aborts the process (SIGABRT).
        gc.collect()
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------- gather


def _all_gather_rows(
    tensor: torch.Tensor, dist: Distributed, counts: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, and the row counts.

    ``counts``, every rank's row count when the caller knows them (a sharded batch does,
    from its host-side layout), spares the exchange of shapes: on NCCL an object gather
    moves bytes through the GPU and waits for it, twice."""
    if counts is not None:
        if len(counts) != dist.world_size or counts[dist.rank] != tensor.shape[0]:
            raise ValueError(
                f"gather: counts {counts} do not give rank {dist.rank} of {dist.world_size} "
                f"its {tensor.shape[0]} rows"
            )
    else:
        # all_gather needs equal sizes, so shorter ranks pad to the longest. Objects rather
        # than a shape tensor, so that a rank with another number of dimensions or another
        # dtype is reported, on every rank, instead of failing inside the backend.
        layouts = dist.all_gather_objects((tuple(tensor.shape), str(tensor.dtype)))
        shapes = [shape for shape, _ in layouts]
        if any(not shape for shape in shapes) or len({(s[1:], d) for s, d in layouts}) != 1:
            listed = "; ".join(f"rank {r}: {s} {d}" for r, (s, d) in enumerate(layouts))
            raise ValueError(
                f"gather: every rank needs a tensor with rows, the same trailing shape and "
                f"the same dtype ({listed})"
            )
        counts = [shape[0] for shape in shapes]
    most = max(counts)
    padded = tensor.contiguous()
    if tensor.shape[0] < most:
        padding = tensor.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([padded, padding])
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]), counts


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, tensor: torch.Tensor, dist: Distributed, counts: list[int] | None
    ) -> torch.Tensor:
        gathered, counts = _all_gather_rows(tensor, dist, counts)
        start = sum(counts[: dist.rank])
        ctx.rows = slice(start, start + counts[dist.rank])
        return gathered

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Each rank holds the gradient of its own loss with respect to all gathered rows; the
        # gradient of the global loss with respect to this rank's rows is their sum over ranks.
        # A copy, because all_reduce works in place and autograd may share `grad` elsewhere.
        summed = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(summed, op=tdist.ReduceOp.SUM)
        return summed[ctx.rows], None, None


def gather(
    tensor: torch.Tensor, dist: Distributed, counts: list[int] | None = None
) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, with gradient.

    Ranks may hold different numbers of rows; the trailing shape and dtype must agree. The
    backward gives each rank the sum over ranks of the gradient of its own rows (see the
    module docstring), so every rank must backpropagate through the result. The identity
    for a single process. ``counts`` (every rank's row count, where the caller knows them)
    saves the exchange of shapes, which waits for the device.
    """
    if not dist.enabled:
        return tensor
    return _GatherWithGradient.apply(tensor, dist, counts)


def gather_ints(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Every rank's integer ``tensor`` (document ids, labels) concatenated along dim 0 in
    rank order, without gradient. Floating-point tensors go through :func:`gather`, so that
    embeddings cannot lose their gradient by accident."""
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"gather_ints: got a {tensor.dtype} tensor; use gather() for those")
    if not dist.enabled:
        return tensor
    gathered, _ = _all_gather_rows(tensor, dist)
    return gathered
