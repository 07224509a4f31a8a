"""biencoder.training.distributed: launcher environments and devices without any process group, and
the collectives and the gradient-carrying gather in two spawned CPU processes over Gloo
(the checks themselves are in tests/dist_worker.py)."""

from __future__ import annotations

import dist_worker
import pytest
import torch
import torch.distributed as tdist

from biencoder.runtime.device import resolve_device
from biencoder.training.distributed import (
    Distributed,
    Launch,
    gather,
    gather_ints,
    init_distributed,
    launch_from_env,
    parse_nodelist,
)

# ---------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[01-02,07]", ["gpu01", "gpu02", "gpu07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("gpu-a100-[1-2],cpu-x", ["gpu-a100-1", "gpu-a100-2", "cpu-x"]),
        ("r[1-2]-n[3,5]", ["r1-n3", "r1-n5", "r2-n3", "r2-n5"]),
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
        ("c[7],d[09]", ["c7", "d09"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist", ["", "a,,b", "node[1-3", "node1]", "node[[1]]", "node[3-1]", "node[a-b]", "n[]"]
)
def test_parse_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="node list"):
        parse_nodelist(nodelist)


# ---------------------------------------------------------------------------- launchers


def _slurm(nodelist: str, **extra: str) -> dict[str, str]:
    return {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_ID": "4331987",
        **extra,
    }


@pytest.mark.parametrize(
    ("nodelist", "master"),
    [("node1", "node1"), ("node[1-3]", "node1"), ("gpu[01-02,07]", "gpu01"), ("a1,b[2-3]", "a1")],
)
def test_slurm_launch(nodelist, master):
    launch = launch_from_env(_slurm(nodelist))
    # 4331987 % 20000 = 11987
    assert launch == Launch(3, 4, 1, master, 31987, "slurm")
    assert launch.init_method == f"tcp://{master}:31987"


def test_slurm_launch_prefers_master_port_and_the_step_node_list():
    env = _slurm("gpu[01-04]", MASTER_PORT="29511", SLURM_STEP_NODELIST="gpu[03-04]")
    launch = launch_from_env(env)
    assert (launch.master_addr, launch.master_port) == ("gpu03", 29511)


def test_torchrun_launch_wins_over_slurm():
    env = {
        **_slurm("node[1-2]"),
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29500",
    }
    launch = launch_from_env(env)
    assert launch == Launch(5, 8, 1, "10.0.0.7", 29500, "torchrun")
    assert launch.init_method == "env://"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1"},
        {"RANK": "0", "WORLD_SIZE": "1"},
        _slurm("node1", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0"),
    ],
    ids=["nothing", "salloc-shell", "torchrun-1", "slurm-1-task"],
)
def test_single_process_launch(env):
    assert launch_from_env(env) is None


def _without(env: dict[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if key != name}


_TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (_without(_TORCHRUN, "MASTER_ADDR"), "without MASTER_ADDR, MASTER_PORT"),
        ({"RANK": "1"}, "without WORLD_SIZE"),
        ({**_TORCHRUN, "RANK": "2", "MASTER_PORT": "1"}, "rank 2 .* world size 2"),
        (_slurm("node1", SLURM_NTASKS="two"), "SLURM_NTASKS='two'"),
        (_without(_slurm("node1"), "SLURM_JOB_ID"), "without SLURM_JOB_ID"),
        (_without(_slurm("node1"), "SLURM_JOB_NODELIST"), "without SLURM_JOB_NODELIST"),
    ],
)
def test_launch_errors(env, message):
    with pytest.raises(ValueError, match=message):
        launch_from_env(env)


def test_init_distributed_without_a_launcher(monkeypatch):
    for name in dist_worker.LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == Distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_distributed("cpu") == Distributed()
    assert not tdist.is_initialized()


# ---------------------------------------------------------------------------- devices


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_devices_without_cuda(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3, distributed=True) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=1, distributed=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cannot run distributed"):
        resolve_device("meta", distributed=True)


def test_devices_with_cuda(monkeypatch):
    _fake_gpus(monkeypatch, 4)
    # A single process takes what it is given.
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:2") == torch.device("cuda", 2)
    # Several processes: each its local rank's GPU, whatever the spelling of "cuda".
    assert resolve_device("auto", local_rank=3, distributed=True) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1, distributed=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="names one GPU for every process"):
        resolve_device("cuda:0", local_rank=0, distributed=True)
    # A launcher that binds one GPU to each task leaves each process a single cuda:0.
    _fake_gpus(monkeypatch, 1)
    assert resolve_device("auto", local_rank=3, distributed=True) == torch.device("cuda", 0)


# ---------------------------------------------------------------------------- one process


def test_single_process_is_the_identity():
    dist = Distributed()
    assert not dist.enabled and dist.is_main
    dist.barrier()
    payload = {"a": [1]}
    assert dist.broadcast_object(payload) is payload
    assert dist.all_gather_objects(payload) == [payload]
    assert dist.mean({"loss": 2, "acc": 0.5}) == {"loss": 2.0, "acc": 0.5}
    assert dist.reduce({"n": 3}, "sum") == {"n": 3.0}
    with pytest.raises(ValueError, match="op 'avg'"):
        dist.reduce({"n": 3}, "avg")
    rows = torch.randn(3, 4, requires_grad=True)
    assert gather(rows, dist) is rows
    ids = torch.arange(3)
    assert gather_ints(ids, dist) is ids
    with pytest.raises(TypeError, match="use gather"):
        gather_ints(rows, dist)


def test_shard():
    for world_size in (1, 2, 3):
        slices = [Distributed(rank, world_size).shard(12) for rank in range(world_size)]
        owned = [i for s in slices for i in range(12)[s]]
        assert owned == list(range(12))
        assert {s.stop - s.start for s in slices} == {12 // world_size}
    assert Distributed(1, 3).shard(9) == slice(3, 6)
    assert Distributed(0, 2).shard(0) == slice(0, 0)
    with pytest.raises(ValueError, match=r"10 items .* world size 4"):
        Distributed(1, 4).shard(10)


# ---------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gather_gradient_is_the_single_process_gradient(tmp_path, dtype):
    dist_worker.run_in_group(
        dist_worker.check_gather_gradient, dtype, rendezvous=tmp_path / "rendezvous"
    )


def test_gather_under_ddp_gives_the_single_process_parameter_gradient(tmp_path):
    dist_worker.run_in_group(dist_worker.check_gather_under_ddp, rendezvous=tmp_path / "rdv")


def test_gather_empty_rank_ids_and_mismatched_shapes(tmp_path):
    dist_worker.run_in_group(dist_worker.check_gather_shapes, rendezvous=tmp_path / "rdv")


def test_collectives(tmp_path):
    dist_worker.run_in_group(dist_worker.check_collectives, rendezvous=tmp_path / "rdv")


def test_init_distributed_from_torchrun_env():
    dist_worker.spawn(dist_worker.init_from_torchrun_env, dist_worker.free_port())


def test_init_distributed_from_slurm_env():
    # A job id whose derived port (20000 + id % 20000) is free now.
    port = dist_worker.free_port(20000, 40000)
    dist_worker.spawn(dist_worker.init_from_slurm_env, 250 * 20000 + port - 20000)
