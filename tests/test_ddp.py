"""Training on several processes (torchrun, DDP over Gloo on CPU) is the single-process
training at the same global batch: step by step in spawned groups, and end to end through
the command line, including a rank killed and the run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ddp_worker
import dist_worker
import pytest
import torch
from configs import ROOT
from safetensors.torch import load_file

from biencoder.data.beir import load_beir
from biencoder.data.paths import TINY_DIR

STEP_CASES = sorted(ddp_worker.CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "cases",
    [STEP_CASES[: len(STEP_CASES) // 2], STEP_CASES[len(STEP_CASES) // 2 :]],
    ids=["first-half", "second-half"],
)
def test_a_distributed_step_is_the_single_process_step(cases, dtype, tiny_model_path, tmp_path):
    """Loss and every parameter gradient of one step on 2 ranks equal one process's on the
    same 6 examples, for every loss (InfoNCE with hard negatives, doc-id masking across
    ranks, symmetric, a learnable temperature, Matryoshka; triplet, contrastive, CoSENT,
    cosine)."""
    dist_worker.run_in_group(
        ddp_worker.check_steps, tiny_model_path, cases, None, dtype, rendezvous=tmp_path / "rv"
    )


@pytest.mark.parametrize("shared", [True, False], ids=["one-tower", "two-towers"])
def test_grad_cache_under_ddp_equals_the_plain_distributed_step(shared, tiny_model_path, tmp_path):
    dist_worker.run_in_group(
        ddp_worker.check_grad_cache, tiny_model_path, shared, rendezvous=tmp_path / "rv"
    )


def test_grad_cache_distributed_step_is_the_single_process_step(tiny_model_path, tmp_path):
    cases = ["infonce-symmetric-learnable", "contrastive-pairs", "cosent"]
    dist_worker.run_in_group(
        ddp_worker.check_steps, tiny_model_path, cases, 2, torch.float32, rendezvous=tmp_path / "rv"
    )


@pytest.mark.parametrize(
    "shared", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["one-tower", "two-towers"]
)
def test_a_distributed_lora_step_is_the_single_process_step(shared, tiny_model_path, tmp_path):
    dist_worker.run_in_group(
        ddp_worker.check_lora, tiny_model_path, shared, rendezvous=tmp_path / "rv"
    )


def test_gathered_layout_keeps_positives_aligned_and_negatives_after_them(tmp_path):
    dist_worker.run_in_group(ddp_worker.check_gathered_layout, rendezvous=tmp_path / "rv")


def test_sharded_encoding_equals_encoding_in_one_process(tiny_model_path, tmp_path):
    dist_worker.run_in_group(
        ddp_worker.check_sharded_encode, tiny_model_path, rendezvous=tmp_path / "rv"
    )


# ------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def triplets_file(tmp_path_factory) -> Path:
    """100 SciFact (query, positive, negative) rows from the tiny bundled set."""
    train = load_beir(TINY_DIR, "train")
    docs = sorted(train.corpus)
    rows = [
        {
            "query": train.queries[q],
            "positive": train.corpus[sorted(train.qrels[q])[0]].full_text,
            "negatives": [train.corpus[docs[(7 * i) % len(docs)]].full_text],
        }
        for i, q in enumerate(sorted(train.qrels))
    ]
    path = tmp_path_factory.mktemp("triplets") / "triplets.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def contract(model: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The arguments of the issue's command line."""
    return [
        "train.py",
        f"model.path={model}",
        "train_data=jsonl",
        f"train_data.path={data}",
        "train_data.format=triplets",
        "trainer.batch_size=16",
        "trainer.max_steps=3",
        "trainer.hidden_dropout=0.0",
        "trainer.eval=false",
        "seed=0",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]


# One thread per rank, as torchrun sets when the caller has not: runs compared bit for bit
# must not pick their thread counts from the caller's environment (OMP_NUM_THREADS=2
# exported reorders sums in one run and not the other).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def test_torchrun_trains_what_one_process_trains(tiny_model_path, triplets_file, tmp_path):
    run(torchrun(*contract(tiny_model_path, triplets_file, tmp_path / "two")))
    run([sys.executable, *contract(tiny_model_path, triplets_file, tmp_path / "one")])
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    for folder, world_size in (("two", 2), ("one", 1)):
        lines = read_jsonl(tmp_path / folder / "metrics.jsonl")
        # Rank 0 alone writes: one line per step, not one per rank.
        assert [line["step"] for line in lines] == [1, 2, 3]
        assert all(line["train/world_size"] == world_size for line in lines)
    losses = [
        [line["train/loss"] for line in read_jsonl(tmp_path / f / "metrics.jsonl")]
        for f in ("two", "one")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_batch_that_does_not_split_across_ranks_fails_naming_the_key(
    tiny_model_path, triplets_file, tmp_path
):
    proc = subprocess.run(
        torchrun(
            *contract(tiny_model_path, triplets_file, tmp_path / "run", "trainer.batch_size=15")
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert (
        "trainer.batch_size: 15 examples cannot be split evenly across 2 processes" in proc.stderr
    )


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def test_a_killed_rank_resumes_to_the_uninterrupted_run(tiny_model_path, triplets_file, tmp_path):
    args = ("trainer.max_steps=12", "trainer.save_every=4", "trainer.deterministic=true")
    whole = tmp_path / "whole"
    run(torchrun(*contract(tiny_model_path, triplets_file, whole, *args)))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun(*contract(tiny_model_path, triplets_file, killed, *args)),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000004" / "checkpoint.json").exists():
        assert proc.poll() is None, "the run ended before a rank could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    proc.wait(timeout=300)
    assert proc.returncode != 0
    assert not (killed / "checkpoints" / "last").exists(), "killed after it had finished"

    run(torchrun(*contract(tiny_model_path, triplets_file, killed, *args, "trainer.resume=true")))
    expected, resumed = weights(whole), weights(killed)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    steps = [line["step"] for line in read_jsonl(killed / "metrics.jsonl") if "train/loss" in line]
    assert steps == list(range(1, 13))


def test_a_distributed_trainer_step_synchronises_a_constant_number_of_times(
    tiny_model_path, tmp_path
):
    dist_worker.run_in_group(
        ddp_worker.check_step_syncs, tiny_model_path, str(tmp_path), rendezvous=tmp_path / "rv"
    )


def test_torchrun_evaluates_through_the_store_as_one_process_does(tiny_model_path, tmp_path):
    # Dev and final evaluations on BEIR data: each rank encodes its own shards of the store
    # (a shard of 16 rows, so both ranks write some), no rank gathers the corpus, and the
    # final evaluation of best finds the corpus the dev evaluation wrote.
    args = [
        "train.py",
        "debug=tiny",
        f"model.path={tiny_model_path}",
        "trainer.hidden_dropout=0.0",
        "evaluation.shard_rows=16",
        "seed=0",
    ]
    run(torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}"))
    run([sys.executable, *args, f"hydra.run.dir={tmp_path / 'one'}"])
    two, one = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("two", "one"))
    assert two["docs_encoded"] == one["docs_encoded"] == 0
    for key in ("ndcg@10", "recall@100", "map@100", "uniformity", "norm_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    (entry,) = (tmp_path / "two" / "embeddings").glob("doc-*")
    assert len(list(entry.glob("shard-*.npy"))) > 2
