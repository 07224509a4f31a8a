"""train.py end to end on a tiny random BERT and small real data.

Most runs compose the config in-process (the same composition as the command line);
the command-line contract and the crash/resume test run real subprocesses.
"""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from configs import ROOT, compose_train
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from wandb_file import run_contents

import train as train_cli
from model import POOLING_HEADS, BiEncoder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run_folder(run_dir: Path, steps: int = 2) -> list[dict]:
    lines = read_jsonl(run_dir / "metrics.jsonl")
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, steps + 1))
    assert all(math.isfinite(line["train/loss"]) for line in train_lines)
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()
    return lines


@pytest.mark.parametrize(
    ("loss", "data"),
    [
        ("infonce", "beir"),
        ("triplet", "beir"),
        ("contrastive", "beir"),
        ("matryoshka", "beir"),
        ("cosent", "sts"),
        ("cosine", "sts"),
        ("contrastive", "sts"),
    ],
)
def test_two_steps_with_each_loss(loss, data, tiny_run, tmp_path):
    extra = ["loss.matryoshka_dims=[32,16]"] if loss == "matryoshka" else []
    metrics = train_cli.train(compose_train(*tiny_run(data, f"loss={loss}", *extra)), tmp_path)
    lines = check_run_folder(tmp_path)
    selection = "ndcg@10" if data == "beir" else "spearman"
    dev_values = [line[f"dev/{selection}"] for line in lines if f"dev/{selection}" in line]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert selection in saved
    # train() returns the final evaluation plus the best dev value of the selection metric.
    assert metrics.pop(f"dev/{selection}") == max(dev_values)
    assert saved == pytest.approx(metrics)
    if loss == "matryoshka":
        # The loss's dims are scored at every evaluation without naming them again.
        assert "dim16/ndcg@10" in saved
        assert any("dev/dim16/ndcg@10" in line for line in lines)


@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_two_steps_with_each_pooling(pooling, tiny_run, tmp_path):
    train_cli.train(
        compose_train(*tiny_run("beir", f"pooling={pooling}", "trainer.eval=false")), tmp_path
    )
    check_run_folder(tmp_path)
    assert BiEncoder.from_pretrained(tmp_path / "checkpoints" / "last").config.pooling == pooling
    assert not (tmp_path / "metrics.json").exists()


def test_gradcache_and_hard_negatives_run(tiny_run, tmp_path):
    overrides = tiny_run(
        "beir",
        "trainer.cache_chunk_size=3",
        "train_data.hard_negatives=2",
        "trainer.eval=false",
        "loss.loss.learnable_temperature=true",
    )
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = check_run_folder(tmp_path)
    assert all("train/temperature" in line for line in lines if "train/loss" in line)


def test_epochs_follow_one_another(tiny_run, tmp_path):
    train_cli.train(
        compose_train(
            *tiny_run(
                "beir", "trainer.max_steps=10", "trainer.eval=false", "train_data.dev_queries=0"
            )
        ),
        tmp_path,
    )
    epochs = [
        line["train/epoch"]
        for line in read_jsonl(tmp_path / "metrics.jsonl")
        if "train/loss" in line
    ]
    assert epochs[0] == 0 and epochs[-1] >= 1
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(epochs))


def test_main_returns_the_optimized_metric_for_sweepers(tiny_run, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def run_main(metric: str, run_dir: Path):
        cfg = compose_train(
            *tiny_run("beir", f"optimized_metric={metric}"),
            f"hydra.run.dir={run_dir}",
            hydra_config=True,
        )
        with open_dict(cfg):
            # What Hydra's run_job fills in before it calls main.
            cfg.hydra.runtime.output_dir = str(run_dir)
            HydraConfig.instance().set_config(cfg)
            del cfg["hydra"]
        return train_cli.main.__wrapped__(cfg)

    value = run_main("ndcg@10", tmp_path / "a")
    assert value == json.loads((tmp_path / "a" / "metrics.json").read_text())["ndcg@10"]
    best_dev = run_main("dev/ndcg@10", tmp_path / "b")
    dev = [
        line["dev/ndcg@10"]
        for line in read_jsonl(tmp_path / "b" / "metrics.jsonl")
        if "dev/ndcg@10" in line
    ]
    assert best_dev == max(dev)
    with pytest.raises(KeyError, match=r"optimized_metric: 'ndcg@11' is not among"):
        run_main("ndcg@11", tmp_path / "c")


def test_command_line_contract(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", *tiny_run("beir"), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run_folder(run_dir)
    assert "ndcg@10" in json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    last = run_dir / "checkpoints" / "last"
    texts = ["a claim about proteins", "an abstract on cell biology and its methods"]
    ours = BiEncoder.from_pretrained(last).encode(texts, kind="doc")
    theirs = torch.as_tensor(SentenceTransformer(str(last), device="cpu").encode(texts))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_run, tmp_path):
    overrides = tiny_run(
        "beir",
        "trainer.max_steps=40",
        "trainer.save_every=4",
        "trainer.deterministic=true",
        "trainer.eval=false",
        "train_data.dev_queries=0",
    )
    command = [sys.executable, "train.py", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    whole = tmp_path / "whole"
    subprocess.run(
        [*command, f"hydra.run.dir={whole}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, f"hydra.run.dir={killed}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000012").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "last").exists(), "killed after it had finished"

    subprocess.run(
        [*command, f"hydra.run.dir={killed}", "trainer.resume=true"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    expected, resumed = last_weights(whole), last_weights(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    steps = [line["step"] for line in read_jsonl(killed / "metrics.jsonl") if "train/loss" in line]
    assert steps == list(range(1, 41))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1e-5", "optim.lr: must be positive"),
        ("model.pooling=avg", "model.pooling: unknown pooling 'avg'"),
        ("trainer.batch_size=1", "trainer.batch_size: must be >= 2"),
        ("trainer.precision=fp16", "trainer.precision: must be one of auto, fp32, bf16"),
        ("trainer.save_every=0", "trainer.save_every: must be positive"),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_cli.train(compose_train(override), tmp_path)
    assert not any(tmp_path.iterdir())


def test_batch_larger_than_the_data_fails_instead_of_waiting_forever(tiny_run, tmp_path):
    # An epoch with no full batch would leave the trainer asking for batches forever.
    with pytest.raises(ValueError, match=r"trainer.batch_size: 1000 is more than the \d+"):
        train_cli.train(compose_train(*tiny_run("beir", "trainer.batch_size=1000")), tmp_path)


def test_unknown_keys_and_options_fail_at_composition():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(ConfigCompositionException, match=r"trainer\.nonsense"):
        compose_train("trainer.nonsense=1")
    with pytest.raises(MissingConfigException, match="pooling"):
        compose_train("pooling=avg")


def test_wandb_offline_run_folder_holds_the_logged_keys(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_cli.train(
        compose_train(*tiny_run("beir", "logger=wandb", "trainer.eval=false")), tmp_path
    )
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    run = run_contents(run_folder)
    logged = {key for row in run["history"] for key in row}
    for key in (
        "train/loss",
        "train/lr",
        "train/temperature",
        "train/grad_norm",
        "train/accuracy",
        "train/margin",
        "train/examples_per_s",
        "dev/ndcg@10",
    ):
        assert key in logged, key
    assert run["config"]["trainer"]["batch_size"] == 4
