"""train.py end to end on a tiny random BERT and small real data.

Most runs compose the config in-process (the same composition as the command line);
the command-line contract and the crash/resume test run real subprocesses.
"""

import dataclasses
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

from biencoder import train as train_cli
from biencoder.model.biencoder import BiEncoder
from biencoder.model.pooling import POOLING_HEADS
from biencoder.training.hydra_config import ConfigError
from biencoder.training.trainer import NonFiniteError


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
    metrics = train_cli.train(compose_train(*tiny_run(data, f"loss={loss}")), tmp_path)
    lines = check_run_folder(tmp_path)
    selection = "ndcg@10" if data == "beir" else "spearman"
    dev_values = [line[f"dev/{selection}"] for line in lines if f"dev/{selection}" in line]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert selection in saved
    # train() returns the final evaluation plus the best dev value of the selection metric.
    assert metrics.pop(f"dev/{selection}") == max(dev_values)
    assert saved == pytest.approx(metrics)
    if loss == "matryoshka":
        # Its dims default to the model's width and halvings (the tiny model is 32 wide),
        # and are scored at every evaluation without naming them again.
        assert {k.split("/")[0] for k in saved if k.startswith("dim")} == {"dim16", "dim8", "dim4"}
        assert any("dev/dim4/ndcg@10" in line for line in lines)


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
        "loss.learnable_temperature=true",
    )
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = check_run_folder(tmp_path)
    assert all("train/temperature" in line for line in lines if "train/loss" in line)


def test_epochs_follow_one_another(tiny_run, tmp_path):
    train_cli.train(
        compose_train(
            *tiny_run("beir", "trainer.max_steps=10", "trainer.eval=false", "trainer.eval_every=0")
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


# The dense case (20 s) is `slow`: the default run's time limit (README) leaves no room.
@pytest.mark.parametrize("mining", ["bm25", pytest.param("dense", marks=pytest.mark.slow)])
def test_resume_after_sigkill_equals_uninterrupted_run(mining, tiny_run, tmp_path):
    # With dense mining, a resumed run that mined again would mine with the checkpoint's
    # model and train on other negatives: it must reuse the run's hard_negatives.json.
    overrides = tiny_run(
        "beir",
        "trainer.max_steps=40",
        "trainer.save_every=4",
        "trainer.deterministic=true",
        "trainer.eval=false",
        "train_data.dev_queries=0",
        f"train_data.mining={mining}",
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
        ("optim.lr=-1e-5", "optim: Invalid learning rate: -1e-05"),
        ("model.pooling=avg", "model.pooling: unknown pooling 'avg'"),
        ("model.projection_dim=0", "model.projection_dim: must be positive or null, got 0"),
        ("trainer.batch_size=1", "trainer.batch_size: must be >= 2"),
        ("trainer.precision=fp16", "trainer.precision: must be one of auto, fp32, bf16"),
        ("trainer.save_every=0", "trainer.save_every: must be positive"),
        ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints: must be >= 0, got -1"),
        ("trainer.resume=''", "trainer.resume: must be true, false or a checkpoint path"),
        ("loss.temperature=5", r"loss.temperature: must be in \[0.01, 1.0\], got 5"),
        ("loss.matryoshka_dims=[64,512]", "loss.matryoshka_dims: .* exceed the model's 384"),
        ("loss.matryoshka_weights=[1.0]", "loss.matryoshka_weights: 1 weights for 0"),
        ("loss=triplet loss.distance=dot", "loss.distance: must be one of"),
        ("train_data.mining=foo", "train_data.mining: 'foo' is not one of bm25, dense"),
        ("train_data.hard_negatives=-1", "train_data.hard_negatives: must be >= 0"),
        ("eval_data.corpus_size=0", "eval_data.corpus_size: must be positive or null"),
        ("evaluation.ks=[0,10]", r"evaluation.ks: cut-offs must be positive"),
        ("evaluation.matryoshka_dims=[1000]", "evaluation.matryoshka_dims: .* exceed"),
        ("evaluation.index.nprobe=0", "evaluation.index.nprobe: must be positive or null"),
        ("sched.warmup_ratio=1.5", r"sched.warmup_ratio: must be in \[0, 1\)"),
        ("train_data=sts", "loss: InfoNCETask trains on Pair or Triplet examples"),
        ("loss=cosent", "loss: CoSENTTask trains on ScoredPair examples"),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train_cli.train(compose_train(*override.split()), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.batch_size=2.5", "trainer.batch_size"),
        ("optim.lr=5e-5x", "optim.lr"),
        ("loss.temperature=warm", "loss.temperature"),
        ("train_data.dev_queries=many", "train_data.dev_queries"),
        ("evaluation.index.use_gpu=maybe", "evaluation.index.use_gpu"),
        ("model.normalize=maybe", "model.normalize"),
        ("trainer.nonsense=1", "trainer.nonsense"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_at_composition_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as caught:
        compose_train(override)
    chain = f"{caught.value} {caught.value.__cause__}"
    assert key in chain, chain


def test_batch_larger_than_the_data_fails_instead_of_waiting_forever(tiny_run, tmp_path):
    # An epoch with no full batch would leave the trainer asking for batches forever.
    with pytest.raises(
        ConfigError,
        match=r"trainer.batch_size: there are only \d+ training examples; a batch of 1000 needs",
    ):
        train_cli.train(compose_train(*tiny_run("beir", "trainer.batch_size=1000")), tmp_path)


def test_training_data_whose_texts_all_repeat_is_blamed_on_the_data(tiny_run, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "what is x", "positive": "x is y"}\n' * 100)
    overrides = tiny_run(
        "beir", "train_data=jsonl", f"train_data.path={pairs}", "trainer.eval=false"
    )
    with pytest.raises(ConfigError, match="100 examples share the text 'what is x'"):
        train_cli.train(compose_train(*overrides), tmp_path / "run")


def test_scores_beyond_the_loss_scale_fail_before_training_naming_file_and_line(tiny_run, tmp_path):
    scored = tmp_path / "scored.jsonl"
    rows = [{"text1": f"a{i}", "text2": f"b{i}", "score": 4.0} for i in range(8)]
    rows[5]["score"] = 7.5
    scored.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for loss in ("cosine", "contrastive"):
        overrides = tiny_run(
            "sts",
            f"loss={loss}",
            "train_data=jsonl",
            f"train_data.path={scored}",
            "train_data.format=scored_pairs",
            "trainer.eval=false",
        )
        run_dir = tmp_path / loss
        with pytest.raises(ValueError, match=rf"{scored}:6: score 7.5 outside \[0, 5.0\]"):
            train_cli.train(compose_train(*overrides), run_dir)
        assert not (run_dir / "metrics.jsonl").exists()


def test_unknown_options_fail_at_composition():
    from hydra.errors import MissingConfigException

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


def test_trainer_profile_follows_the_machine(monkeypatch):
    from configs import compose_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    picked_on_gpu = compose_config("train", hydra_config=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    picked_on_cpu = compose_config("train", hydra_config=True)
    assert picked_on_gpu.hydra.runtime.choices.trainer == "gpu"
    assert picked_on_cpu.hydra.runtime.choices.trainer == "cpu"
    gpu, cpu = picked_on_gpu.trainer, picked_on_cpu.trainer
    assert (gpu.precision, cpu.precision) == ("bf16", "auto")
    assert gpu.batch_size > cpu.batch_size and gpu.cache_chunk_size < gpu.batch_size
    assert gpu.max_length is None and gpu.epochs > cpu.epochs
    # Named on the command line, a profile wins over the machine's.
    assert compose_config("train", "trainer=cpu").trainer == cpu


def test_the_run_log_says_which_trainer_profile_runs_and_why(caplog, monkeypatch):
    from configs import compose_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level("INFO", logger="train")
    train_cli.log_trainer_choice(compose_config("train", hydra_config=True).hydra)
    assert "trainer=cpu (picked for this machine: no CUDA device" in caplog.text
    caplog.clear()
    chosen = compose_config("train", "trainer=gpu", hydra_config=True)
    train_cli.log_trainer_choice(chosen.hydra)
    assert "trainer=gpu (from the command line)" in caplog.text


def test_the_gpu_profile_trains_on_a_cpu_too(tiny_run, tmp_path):
    # bf16 autocast and GradCache chunks run on CPU as well, so the profile is exercised here.
    train_cli.train(compose_train(*tiny_run("beir", "trainer=gpu", "trainer.eval=false")), tmp_path)
    check_run_folder(tmp_path)


def test_matryoshka_dims_default_to_the_model_width_and_its_halvings(tiny_model_path):
    assert compose_train("loss=matryoshka").loss.matryoshka_dims == [384, 192, 96, 48]
    tiny = compose_train("loss=matryoshka", f"model.path={tiny_model_path}")
    assert tiny.loss.matryoshka_dims == [32, 16, 8, 4]
    projected = compose_train("loss=matryoshka", "model.projection_dim=256")
    assert projected.loss.matryoshka_dims == [256, 128, 64, 32]
    # Evaluation scores the loss's dims unless told otherwise.
    assert tiny.evaluation.matryoshka_dims == [32, 16, 8, 4]
    assert compose_train(
        "loss=matryoshka", "evaluation.matryoshka_dims=[64]"
    ).evaluation.matryoshka_dims == [64]


@pytest.mark.slow
def test_max_length_contract_on_the_default_job(tmp_path):
    """The issue's command exactly: the packaged MiniLM on SciFact, texts cut to 8 tokens."""
    run_dir = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "trainer.max_length=8",
            "trainer.max_steps=2",
            "trainer.eval=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    lines = [line for line in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in line]
    assert len(lines) == 2 and all(line["train/seq_len_max"] <= 8 for line in lines)


def test_max_length_reaches_the_encoder_and_is_logged(tiny_run, tmp_path):
    train_cli.train(
        compose_train(*tiny_run("beir", "trainer.max_length=8", "trainer.eval=false")), tmp_path
    )
    lines = [line for line in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert all(line["train/seq_len_max"] == 8 for line in lines)  # abstracts are longer
    assert all(line["train/tokens"] > 0 and line["train/tokens_per_s"] > 0 for line in lines)


def test_max_length_is_capped_at_the_position_limit(tiny_run, tmp_path, caplog):
    # The tiny model has 64 positions; asking for 500 trains at 64 and says so.
    caplog.set_level("WARNING", logger="train")
    overrides = tiny_run(
        "beir", "trainer.max_length=500", "model.max_length=64", "trainer.eval=false"
    )
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = [line for line in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert max(line["train/seq_len_max"] for line in lines) == 64
    assert "trainer.max_length=500 is more than the model's 64 positions" in caplog.text


# --------------------------------------------------------------------- reliability


def test_divergence_stops_naming_the_step_and_the_last_good_checkpoint(tiny_run, tmp_path):
    # lr 1e3 without clipping: the weights blow up within a few steps, then the loss is NaN.
    overrides = tiny_run(
        "beir",
        "optim.lr=1e3",
        "trainer.grad_clip=null",
        "trainer.max_steps=30",
        "trainer.eval=false",
        "train_data.dev_queries=0",
    )
    with pytest.raises(NonFiniteError) as stopped:
        train_cli.train(compose_train(*overrides), tmp_path)
    message = str(stopped.value)
    assert "training stopped" in message or "weights hold NaN" in message
    assert "trainer.on_nonfinite" in message or "refusing to write" in message
    checkpoints = tmp_path / "checkpoints"
    assert not (checkpoints / "last").exists()
    # Every checkpoint that was written holds finite weights, and the message names the last.
    written = sorted(p for p in checkpoints.glob("step-*") if (p / "checkpoint.json").exists())
    for folder in written:
        assert all(
            torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values()
        )
    if written:
        assert str(written[-1]) in message


def test_nonfinite_steps_are_skipped_and_counted(tiny_run, tmp_path, monkeypatch):
    # A loss that is NaN at step 2 only: the skip policy drops that update and goes on.
    from biencoder.training import step as step_module

    real = step_module.train_step
    calls = []

    def nan_at_second_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result.loss)
        if len(calls) == 2:
            return dataclasses.replace(result, loss=torch.tensor(float("nan")))
        return result

    monkeypatch.setattr("biencoder.training.trainer.train_step", nan_at_second_step)
    overrides = tiny_run(
        "beir", "trainer.on_nonfinite=skip", "trainer.max_steps=3", "trainer.eval=false"
    )
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = [line for line in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert [line["train/nonfinite_steps"] for line in lines] == [0, 1, 1]
    assert (tmp_path / "checkpoints" / "last").is_dir()

    with pytest.raises(NonFiniteError, match=r"step 2: loss nan.*training stopped"):
        calls.clear()
        train_cli.train(
            compose_train(*tiny_run("beir", "trainer.max_steps=3", "trainer.eval=false")),
            tmp_path / "stop",
        )


def test_a_second_run_into_a_run_folder_is_refused_unless_it_resumes_or_overwrites(
    tiny_run, tmp_path
):
    overrides = tiny_run("beir", "trainer.eval=false", "train_data.dev_queries=0")
    train_cli.train(compose_train(*overrides), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"hydra.run.dir: .* already holds a run \(checkpoints"):
        train_cli.train(compose_train(*overrides), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    train_cli.train(compose_train(*overrides, "trainer.overwrite=true"), tmp_path)
    steps = [
        line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in line
    ]
    assert steps == [1, 2]  # the old lines are gone, not interleaved
    with pytest.raises(ConfigError, match=r"trainer\.overwrite: cannot both start over and resume"):
        train_cli.train(
            compose_train(*overrides, "trainer.overwrite=true", "trainer.resume=true"), tmp_path
        )


def test_resume_takes_the_configuration_from_the_run_folder(tiny_model_path, tmp_path):
    """The README's resume command without the original overrides continues the same run;
    an override that would change it is refused."""
    run_dir = tmp_path / "run"
    first = [
        sys.executable,
        "train.py",
        "debug=tiny",
        f"model.path={tiny_model_path}",
        "trainer.max_steps=2",
        "trainer.eval=false",
        "optim.lr=1e-4",
        "loss=triplet",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(first, cwd=ROOT, check=True, capture_output=True, timeout=600)
    resume = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.resume=true"]
    proc = subprocess.run(
        [*resume, "trainer.max_steps=4"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line["step"] for line in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in line]
    assert steps == [1, 2, 3, 4]
    # The resumed run read the tiny model again (the default is MiniLM, 384 wide).
    assert (
        json.loads((run_dir / "checkpoints" / "last" / "config.json").read_text())["hidden_size"]
        == 32
    )
    refused = subprocess.run(
        [*resume, "optim.lr=1e-3"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert refused.returncode != 0
    assert "trainer.resume: optim.lr=1e-3 (the run has optim.lr=0.0001)" in refused.stderr
    repeated = subprocess.run(
        [*resume, "optim.lr=1e-4", "loss=triplet", "trainer.max_steps=5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert repeated.returncode == 0, repeated.stderr[-3000:]


def test_sigterm_saves_last_and_exits_for_a_requeue(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        *tiny_run(
            "beir",
            "trainer.max_steps=100000",
            "trainer.save_every=100000",
            "trainer.eval=false",
            "train_data.dev_queries=0",
        ),
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (
        not (run_dir / "metrics.jsonl").exists() or len(read_jsonl(run_dir / "metrics.jsonl")) < 3
    ):
        assert proc.poll() is None, "the run ended before it could be terminated"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == train_cli.EXIT_TERMINATED == 143, stderr.decode()[-2000:]
    last = run_dir / "checkpoints" / "last"
    assert (last / "checkpoint.json").is_file()
    saved_step = json.loads((last / "checkpoint.json").read_text())["step"]
    assert 3 <= saved_step < 100000
