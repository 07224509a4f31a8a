"""sentence-transformers' own trainer on the examples a train.py command trains on.

Composes train.py's config from the given overrides, builds its training set exactly as
train.py does (same split, dev hold-out, mined negatives and seed), and trains the same
starting model with ``SentenceTransformerTrainer`` and ``MultipleNegativesRankingLoss`` at
the config's batch size, epochs, learning rate, warm-up, weight decay, gradient clipping,
sequence length and temperature. The result is evaluated by ``eval.py`` on the config's
eval_data, so both runs are scored by the same code. The run folder (``--out``) holds the
model, ``eval/metrics.json`` and ``st_run.json`` (wall times, command, versions).

What stays sentence-transformers' own: its batch sampler (``NO_DUPLICATES``), its dropout
(the checkpoint's, attention included), no dev-set checkpoint selection (the last model
is evaluated) and its fp32 CPU training.

Example (the side-by-side record in bench/results/train_scifact.md)::

    python bench/st_trainer.py --out /tmp/st_run -- trainer.epochs=3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, report_header


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from biencoder.training.hydra_config import register

    register()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=["trainer=cpu", *overrides])


def to_dataset(examples):
    """Our Pair/Triplet examples as sentence-transformers' (anchor, positive, negative_k)
    columns, in the same order."""
    from datasets import Dataset

    columns = {"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]}
    negatives = getattr(examples[0], "negatives", ())
    for k in range(len(negatives)):
        columns[f"negative_{k + 1}"] = [e.negatives[k] for e in examples]
    return Dataset.from_dict(columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder to create")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)

    import torch
    from omegaconf import OmegaConf
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers import (
        __version__ as st_version,
    )
    from sentence_transformers.base.sampler import BatchSamplers

    from biencoder.model.biencoder import BiEncoder
    from biencoder.training.hydra_config import build

    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    cfg = compose(args.overrides)
    loss_cfg = cfg.loss
    if not loss_cfg._target_.endswith("InfoNCETask"):
        raise SystemExit(
            f"loss: only InfoNCE maps onto MultipleNegativesRankingLoss, got {loss_cfg._target_}"
        )
    torch.manual_seed(cfg.seed)
    data = build(cfg.train_data, "train_data")
    mining_model = None
    if getattr(data, "mining", None) == "dense":
        mining_model = BiEncoder.from_pretrained(cfg.model.path)
    training_set = data.load(model=mining_model)
    dataset = to_dataset(training_set.examples)

    model = SentenceTransformer(cfg.model.path, device="cpu")
    if cfg.trainer.max_length is not None:
        model.max_seq_length = min(cfg.trainer.max_length, model.max_seq_length)
    if loss_cfg.guide is not None:
        raise SystemExit("loss.guide: GISTEmbed is not mapped onto sentence-transformers here")
    if loss_cfg.symmetric:
        directions, partition_mode = ("query_to_doc", "doc_to_query"), "per_direction"
    else:
        directions = tuple(loss_cfg.directions or ("query_to_doc",))
        partition_mode = loss_cfg.partition_mode or "joint"
    loss = losses.MultipleNegativesRankingLoss(
        model,
        scale=1.0 / loss_cfg.temperature,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode=loss_cfg.hardness_mode,
        hardness_strength=loss_cfg.hardness_strength,
    )
    if loss_cfg.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, list(loss_cfg.matryoshka_dims))
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.out / "trainer"),
        num_train_epochs=cfg.trainer.epochs,
        max_steps=cfg.trainer.max_steps or -1,
        per_device_train_batch_size=cfg.trainer.batch_size,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_ratio=cfg.sched.warmup_ratio,
        lr_scheduler_type=cfg.sched.decay,
        max_grad_norm=cfg.trainer.grad_clip or 0.0,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=cfg.seed,
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=loss
    )
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started
    model_dir = args.out / "model"
    model.save(str(model_dir))

    eval_started = time.perf_counter()
    eval_dir = args.out / "eval"
    # The eval_data and evaluation nodes train.py would use, resolved (debug=tiny moves them).
    eval_overrides = [
        f"model.path={model_dir}",
        f"hydra.run.dir={eval_dir}",
        f"eval_data.path={cfg.eval_data.path}",
        f"eval_data.split={cfg.eval_data.split}",
        f"evaluation.batch_size={cfg.evaluation.batch_size}",
        f"evaluation.precision={cfg.evaluation.precision}",
    ]
    subprocess.run([sys.executable, "eval.py", *eval_overrides], cwd=REPO_ROOT, check=True)
    eval_s = time.perf_counter() - eval_started
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    record = {
        "header": report_header(
            "sentence-transformers' trainer",
            "cpu",
            load_at_start,
            [f"sentence-transformers {st_version}"],
        ),
        "overrides": args.overrides,
        "examples": len(training_set.examples),
        "steps": trainer.state.global_step,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "loss": OmegaConf.to_container(loss_cfg),
        "metrics": metrics,
    }
    (args.out / "st_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("examples", "steps", "train_s", "wall_s")}))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
