"""Code that runs inside the processes tests/test_distributed.py spawns.

Spawned children import their target by module name, so the targets live here rather than
in the test module. :func:`spawn` waits for every child and re-raises a child's exception in
the parent with the child's traceback (torch.multiprocessing does the formatting); a job
that hangs, one rank waiting in a collective another never reaches, is killed after
``timeout`` seconds instead of blocking the test run.

The checks compute their expected values without torch.distributed: every rank draws the
global batch from the same seed and computes the single-process result itself.
"""

from __future__ import annotations

import datetime
import gc
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from biencoder.training.distributed import (
    Distributed,
    gather,
    gather_ints,
    init_distributed,
    shutdown,
)

WORLD_SIZE = 2
# A collective that waits longer than this has lost its peer: fail rather than hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_ID",
)


def spawn(target: Callable[..., None], *args: Any, timeout: float = 60.0) -> None:
    """Runs ``target(rank, *args)`` in WORLD_SIZE fresh processes and waits for all of them."""
    context = mp.start_processes(
        _child, args=(target, args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                pytest.fail(f"{target.__name__}: ranks still running after {timeout} s")
    except ProcessException as failure:
        # The child's traceback is the message; the parent's frames in torch say nothing.
        pytest.fail(str(failure), pytrace=False)


def _child(rank: int, target: Callable[..., None], args: tuple) -> None:
    # Two ranks share two cores (with other work): more threads only contend.
    torch.set_num_threads(1)
    try:
        target(rank, *args)
    except pytest.fail.Exception as failure:
        # pytest.raises fails with a BaseException, which torch's spawn wrapper does not
        # catch and send back; as an AssertionError its traceback reaches the parent.
        raise AssertionError(str(failure)) from failure


def run_in_group(check: Callable[..., None], *args: Any, rendezvous: Path) -> None:
    """Runs ``check(dist, *args)`` on every rank of a fresh Gloo group."""
    spawn(_in_group, f"file://{rendezvous}", check, args)


def _in_group(rank: int, init_method: str, check: Callable[..., None], args: tuple) -> None:
    tdist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        check(Distributed(rank=rank, world_size=WORLD_SIZE, local_rank=rank), *args)
    finally:
        # A DDP wrapper lives in a reference cycle: left to the collector at interpreter
        # exit, it outlives the group and its reducer aborts the process (SIGABRT).
        gc.collect()
        tdist.destroy_process_group()


def free_port(low: int = 1024, high: int = 65535) -> int:
    """A TCP port in ``[low, high)`` that nothing listens on right now."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Largest difference within ``rel`` times the largest expected magnitude."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x scale {scale:.3g}"


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


def _bounds(counts: tuple[int, ...], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def infonce_both_ways(
    q_local: torch.Tensor,
    d_local: torch.Tensor,
    q_all: torch.Tensor,
    d_all: torch.Tensor,
    offset: int,
    temperature: float = 0.1,
) -> torch.Tensor:
    """A rank's symmetric InfoNCE: its queries against every document and its documents
    against every query, the positive of local row i being global row offset + i."""
    targets = torch.arange(q_local.shape[0]) + offset
    query_loss = F.cross_entropy(q_local @ d_all.T / temperature, targets)
    document_loss = F.cross_entropy(d_local @ q_all.T / temperature, targets)
    return query_loss + document_loss


def mean_of_rank_losses(
    queries: torch.Tensor, documents: torch.Tensor, counts: tuple[int, ...]
) -> torch.Tensor:
    """The single-process value of what the ranks optimise together: the mean over ranks of
    :func:`infonce_both_ways`, rank r owning the rows ``_bounds(counts, r)``."""
    per_rank = [
        infonce_both_ways(
            queries[_bounds(counts, r)],
            documents[_bounds(counts, r)],
            queries,
            documents,
            _bounds(counts, r).start,
        )
        for r in range(len(counts))
    ]
    return torch.stack(per_rank).mean()


# ---------------------------------------------------------------------------- checks


def check_gather_gradient(dist: Distributed, dtype: torch.dtype) -> None:
    """Forward is the concatenation; each rank's input gradient, averaged by 1/W as DDP
    averages, is the single-process gradient of the mean of the per-rank losses."""
    for counts in [(4, 4), (3, 5)]:
        generator = torch.Generator().manual_seed(sum(counts))
        queries = torch.randn(sum(counts), 16, generator=generator, dtype=dtype)
        documents = torch.randn(sum(counts), 16, generator=generator, dtype=dtype)

        expected_q = queries.clone().requires_grad_()
        expected_d = documents.clone().requires_grad_()
        global_loss = mean_of_rank_losses(expected_q, expected_d, counts)
        global_loss.backward()

        rows = _bounds(counts, dist.rank)
        local_q = queries[rows].clone().requires_grad_()
        local_d = documents[rows].clone().requires_grad_()
        gathered_q, gathered_d = gather(local_q, dist), gather(local_d, dist)
        assert torch.equal(gathered_q, queries) and torch.equal(gathered_d, documents), counts
        loss = infonce_both_ways(local_q, local_d, gathered_q, gathered_d, rows.start)
        loss.backward()

        rel = _tolerance(dtype)
        losses = dist.all_gather_objects(loss.item())
        assert abs(sum(losses) / len(losses) - global_loss.item()) <= rel * global_loss.item()
        what = f"{counts} rank {dist.rank}"
        assert_relative(local_q.grad / dist.world_size, expected_q.grad[rows], rel, what)
        assert_relative(local_d.grad / dist.world_size, expected_d.grad[rows], rel, what)


def check_gather_under_ddp(dist: Distributed) -> None:
    """Through a DDP-wrapped model, with unequal rows per rank, the parameter gradients
    equal the single-process gradients of the mean of the per-rank losses."""
    counts = (3, 5)
    generator = torch.Generator().manual_seed(0)
    inputs_q = torch.randn(sum(counts), 8, generator=generator)
    inputs_d = torch.randn(sum(counts), 8, generator=generator)
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 6)
    model = DistributedDataParallel(torch.nn.Linear(8, 6))
    model.module.load_state_dict(reference.state_dict())

    mean_of_rank_losses(reference(inputs_q), reference(inputs_d), counts).backward()

    rows = _bounds(counts, dist.rank)
    # One forward for both columns: DDP expects one forward per backward.
    embedded = model(torch.cat([inputs_q[rows], inputs_d[rows]]))
    local_q, local_d = embedded.split(counts[dist.rank])
    gathered_q, gathered_d = gather(local_q, dist), gather(local_d, dist)
    infonce_both_ways(local_q, local_d, gathered_q, gathered_d, rows.start).backward()

    for name, parameter in model.module.named_parameters():
        expected = reference.get_parameter(name).grad
        assert_relative(parameter.grad, expected, 1e-5, f"{name} on rank {dist.rank}")


def check_gather_shapes(dist: Distributed) -> None:
    """An empty rank, integer ids, and shapes that cannot be concatenated."""
    counts = (0, 3)
    everything = torch.arange(12, dtype=torch.float64).reshape(4, 3)[1:]
    local = everything[_bounds(counts, dist.rank)].clone().requires_grad_()
    gathered = gather(local, dist)
    assert torch.equal(gathered, everything)
    # Rank r's loss weighs every gathered row by r + 1; the gradient of each row is the
    # sum of those weights over ranks.
    ((dist.rank + 1) * gathered.square()).sum().backward()
    weights = sum(r + 1 for r in range(dist.world_size))
    assert torch.equal(local.grad, 2 * weights * local.detach())

    ids = torch.arange(10 * dist.rank, 10 * dist.rank + dist.rank + 1)
    gathered_ids = gather_ints(ids, dist)
    assert gathered_ids.dtype == torch.int64
    assert gathered_ids.tolist() == [0, 10, 11]

    with pytest.raises(ValueError, match="same trailing shape"):
        gather(torch.zeros(2, 4 + dist.rank), dist)
    with pytest.raises(ValueError, match="same dtype"):
        gather(torch.zeros(2, 4, dtype=torch.float32 if dist.rank else torch.float64), dist)


def check_collectives(dist: Distributed) -> None:
    other = 1 - dist.rank
    values = {"loss": dist.rank + 1.0, "count": 10 * dist.rank}
    if dist.rank:
        # The same keys in another order: reduced by name, returned in the caller's order.
        values = dict(reversed(values.items()))
    assert dist.mean(values) == {"loss": 1.5, "count": 5.0}
    assert list(dist.mean(values)) == list(values)
    assert dist.reduce(values, "sum") == {"loss": 3.0, "count": 10.0}
    assert dist.reduce(values, "max") == {"loss": 2.0, "count": 10.0}
    assert dist.reduce(values, "min") == {"loss": 1.0, "count": 0.0}
    with pytest.raises(ValueError, match="op 'avg'"):
        dist.reduce(values, "avg")
    with pytest.raises(ValueError, match="different keys"):
        dist.mean({f"key{dist.rank}": 1.0})

    assert dist.broadcast_object({"from": dist.rank}) == {"from": 0}
    assert dist.broadcast_object({"from": dist.rank}, src=1) == {"from": 1}
    with pytest.raises(ValueError, match="src 2"):
        dist.broadcast_object(None, src=2)
    assert dist.all_gather_objects(("rank", dist.rank)) == [("rank", 0), ("rank", 1)]
    assert dist.all_gather_objects(other) == [1, 0]
    mine = torch.tensor([dist.rank, 10.0 + dist.rank], dtype=torch.float64)
    assert dist.gather_rows(mine) == [[0.0, 10.0], [1.0, 11.0]]
    dist.barrier()


# ---------------------------------------------------------------------------- launchers


def _launch_env(variables: dict[str, str]) -> None:
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(variables)


def init_from_torchrun_env(rank: int, port: int) -> None:
    """As torchrun starts one process on each of two nodes: local rank 0 on both."""
    _launch_env(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    _check_initialised(init_distributed("auto"), rank, local_rank=0)


def init_from_slurm_env(rank: int, job_id: int) -> None:
    """As srun starts task ``rank`` of two on one node, with the port left to the job id."""
    _launch_env(
        {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(WORLD_SIZE),
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost,unreachable[1-2]",
            "SLURM_JOB_ID": str(job_id),
        }
    )
    _check_initialised(init_distributed("cpu"), rank, local_rank=rank)


def _check_initialised(dist: Distributed, rank: int, local_rank: int) -> None:
    assert dist == Distributed(rank, WORLD_SIZE, local_rank, torch.device("cpu"))
    assert tdist.is_initialized() and tdist.get_backend() == "gloo"
    assert (tdist.get_rank(), tdist.get_world_size()) == (rank, WORLD_SIZE)
    assert dist.all_gather_objects(rank) == [0, 1]
    # A second call joins nothing new: it describes the group that exists.
    assert init_distributed("cpu") == dist
    shutdown(dist)
    assert not tdist.is_initialized()
