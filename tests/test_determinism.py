"""Determinism: with the seed fixed a CPU run reproduces its metrics exactly, and the data
a run sees (held-out dev split, mined negatives, batch order) depends on the seed only."""

import json
import os
import subprocess
import sys
from pathlib import Path

from configs import ROOT, compose_train

from biencoder import train as train_cli

# Wall-clock measurements differ between any two runs; everything else must not.
CLOCK_KEYS = {"time", "train/examples_per_s"}


def without_clocks(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if k not in CLOCK_KEYS and not k.endswith("_s") and k != "docs_per_s"
    }


def run_metrics(run_dir: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "metrics.json").read_text())
    return [without_clocks(line) for line in lines], without_clocks(final)


def test_same_seed_reproduces_every_metric_exactly(tiny_run, tmp_path):
    overrides = tiny_run(
        "beir", "seed=3", "trainer.max_steps=3", "train_data.hard_negatives=1", "pooling=attention"
    )
    for name in ("a", "b"):
        train_cli.train(compose_train(*overrides), tmp_path / name)
    lines_a, final_a = run_metrics(tmp_path / "a")
    lines_b, final_b = run_metrics(tmp_path / "b")
    assert len(lines_a) >= 4 and "ndcg@10" in final_a
    assert lines_a == lines_b
    assert final_a == final_b


def test_another_seed_changes_the_run(tiny_run, tmp_path):
    for seed in (0, 1):
        train_cli.train(
            compose_train(*tiny_run("beir", f"seed={seed}", "trainer.eval=false")),
            tmp_path / str(seed),
        )
    losses = [
        [
            json.loads(line).get("train/loss")
            for line in (tmp_path / str(seed) / "metrics.jsonl").read_text().splitlines()
        ]
        for seed in (0, 1)
    ]
    assert losses[0] != losses[1]


DATA_PLAN = """
import hashlib, json, sys
from biencoder.data.sampler import NoDuplicateBatchSampler
from biencoder.data.training_sets import BeirTrainingSet
from biencoder.training.trainer import example_texts

seed = int(sys.argv[1])
data = BeirTrainingSet(sys.argv[2], dev_queries=4, dev_corpus_size=30, hard_negatives=2,
                       seed=seed).load()
sampler = NoDuplicateBatchSampler([example_texts(e) for e in data.examples], 4, seed=seed)
plan = [[data.examples[i] for i in batch] for epoch in range(2) for batch in sampler]
print(hashlib.sha256(json.dumps([sorted(data.dev.queries), sorted(data.dev.corpus),
                                 [[repr(e) for e in b] for b in plan]]).encode()).hexdigest())
"""


def data_plan(seed: int, hash_seed: str, beir_path: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", DATA_PLAN, str(seed), beir_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_data_order_is_a_function_of_the_seed_only(tiny_beir_path):
    # Python salts str hashes per process: set or dict iteration over texts would leak that
    # salt into the dev split, the mined negatives or the batches.
    first = data_plan(0, "1", tiny_beir_path)
    assert data_plan(0, "2", tiny_beir_path) == first
    assert data_plan(1, "1", tiny_beir_path) != first
