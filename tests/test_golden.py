"""Golden trajectories: the first optimizer steps of each training configuration users run,
pinned to values recorded in ``tests/golden/<name>.json``.

Each test trains a few steps in-process through ``train.train`` and compares the logged
``train/loss``, ``train/grad_norm`` and ``train/lr`` of every step (and a multi-set run's
``train/loss/<set>``) with the recorded ones. The other tests check each part against an
oracle; these catch what no single oracle sees: a different batch (sampler, seed use,
mining, data split), a changed default (a loss's temperature or scale, the learning rate or
its schedule), or a change in how the step's pieces fit together.

A change that moves them on purpose is recorded with ``python -m pytest tests/test_golden.py
--update-golden``, which rewrites the files (with the commit they were recorded on top of);
the commit that carries the new values says why they moved.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from configs import ROOT, compose_config, compose_train

from biencoder import mine as mine_cli
from biencoder import train as train_cli

GOLDEN = Path(__file__).parent / "golden"
STEPS = 3

# Every run: the CPU (the values are CPU values, also on a machine with CUDA), a step per
# line, no final evaluation, and a loss that depends on the learning rate at steps 2 and 3.
SHORT = (
    "device=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.max_length=32",
    "trainer.log_every=1",
    "trainer.eval=false",
)
# The tiny random BERT on data/bundled/tiny (debug=tiny: batches of 4).
TINY = ("debug=tiny", "model.path={tiny_model}")
# Triplets mined densely by mine.py with the packaged MiniLM, which also scores them as
# the teacher; texts cut to 32 tokens so that mining and scoring take a second or two.
MINE = (
    "device=cpu",
    "data.path=${bundled:tiny}",
    "data.split=train",
    "retriever=dense",
    "model.max_length=32",
    "num_negatives=1",
    "teacher.path=${packaged_model:}",
    "teacher.max_length=32",
)

# name -> train.py overrides; {tiny_model}, {mined} and {hf} are the fixtures' folders.
# A dev set is evaluated once, after the last step, whatever trainer.eval_every says, and
# cannot change the pinned steps: where holding it out is part of the configuration (the
# main job's 80 dev queries) it stays, made cheap; elsewhere it is switched off.
CONFIGS: dict[str, tuple[str, ...]] = {
    # python train.py: MiniLM, bundled SciFact, BM25 hard negatives, batch 32. The dev
    # evaluation at 32 tokens over 100 documents: model.max_length reaches only evaluation
    # once trainer.max_length is set, and dev_corpus_size only the dev set.
    "main": (*SHORT, "model.max_length=32", "train_data.dev_corpus_size=100"),
    # CoSENT on STS-B train, batch 16, lr 5e-5.
    "sts": ("experiment=sts", *SHORT, "train_data.dev_split=null"),
    "jsonl_dense_mined": (
        *TINY,
        *SHORT,
        "train_data=jsonl",
        "train_data.format=triplets",
        "train_data.path={mined}",
    ),
    "hf": (*TINY, *SHORT, "train_data=hf", "train_data.path={hf}"),
    # A BEIR set with a BM25 negative and a 🤗 set of pairs, in a seeded proportional shuffle.
    "multi": (
        *TINY,
        *SHORT,
        "train_data=multi",
        "+train_data@train_data.sets.scifact=scifact",
        "train_data.sets.scifact.dev_queries=0",
        "+train_data@train_data.sets.qa=hf",
        "train_data.sets.qa.path={hf}",
    ),
    "margin_mse": (
        *TINY,
        *SHORT,
        "train_data=jsonl",
        "train_data.format=triplets",
        "train_data.path={mined}",
        "loss=margin_mse",
    ),
    # Chunks of 3 texts that do not divide the batch's 8 queries or 24 texts.
    "gradcache": (
        *TINY,
        *SHORT,
        "train_data.dev_queries=0",
        "trainer.batch_size=8",
        "trainer.cache_chunk_size=3",
    ),
}

# How far a value may move between two correct runs, relative to its size. Measured over
# all seven runs: 1 against 2 threads moved losses and gradient norms by at most 6e-7;
# ATen's, MKL's and oneDNN's kernels held to SSE4 (ATEN_CPU_CAPABILITY=default,
# MKL_ENABLE_INSTRUCTIONS=SSE4_2, ONEDNN_MAX_CPU_ISA=SSE41: other summation orders, as
# another x86 CPU's kernels have) by at most 9e-7 and 2e-6. 1e-4 leaves 50x that and
# still sees, in the losses alone, a first step taken at half the learning rate
# (sched.warmup_ratio=0.2: the losses of steps 2 and 3 moved by 1.6e-4 to 1.7e-2).
RTOL = 1e-4
# The schedule is float64 arithmetic on integers: equal but for the last bits.
LR_RTOL = 1e-9


def tolerance(key: str) -> float:
    return LR_RTOL if key == "train/lr" else RTOL


def pinned(line: dict) -> dict[str, float]:
    """The values of one metrics.jsonl step line that the golden files hold."""
    keys = ("train/loss", "train/grad_norm", "train/lr")
    return {k: v for k, v in line.items() if k in keys or k.startswith("train/loss/")}


def commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the module, mining included: on shared cores a second thread
    made these runs two to seven times slower (conftest's one_thread, for a module), and
    the values do not depend on the thread count beyond the tolerances."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_path) -> dict[str, str]:
    """The data the tiny configurations train on, made from data/bundled/tiny."""
    import datasets

    from biencoder.data.beir import load_beir
    from biencoder.data.paths import TINY_DIR

    root = tmp_path_factory.mktemp("golden")
    mined = root / "mined.jsonl"
    mine_cli.run(compose_config("mine", *MINE, f"out={mined}"), root)
    train = load_beir(TINY_DIR, "train")
    pairs = [(train.queries[q], train.corpus[min(train.qrels[q])].full_text) for q in train.qrels]
    datasets.Dataset.from_dict(
        {"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]}
    ).save_to_disk(str(root / "hf"))
    return {"tiny_model": tiny_model_path, "mined": str(mined), "hf": str(root / "hf")}


# ------------------------------------------------------------------------------- tests


def recorded_overrides(name: str) -> dict[str, list[str]]:
    """What a golden file records of how its values were made."""
    record = {"overrides": list(CONFIGS[name])}
    if any("{mined}" in o for o in CONFIGS[name]):
        record["mine_overrides"] = list(MINE)
    return record


def mismatches(expected: list[dict], got: list[dict]) -> list[str]:
    """One line per step that differs, naming each value outside its tolerance."""
    lines = []
    for step, (want, have) in enumerate(zip(expected, got, strict=True), start=1):
        if want.keys() != have.keys():
            lines.append(f"step {step}: logged {sorted(have)}, recorded {sorted(want)}")
            continue
        for key, value in want.items():
            if not math.isclose(have[key], value, rel_tol=tolerance(key), abs_tol=0.0):
                rel = abs(have[key] - value) / abs(value) if value else math.inf
                lines.append(
                    f"step {step} {key}: expected {value!r}, got {have[key]!r} "
                    f"(relative {rel:.2e}, tolerance {tolerance(key):.0e})"
                )
    return lines


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_steps_follow_the_recorded_trajectory(name, folders, request, tmp_path):
    overrides = [o.format(**folders) for o in CONFIGS[name]]
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = [pinned(line) for line in lines if "train/loss" in line]
    assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, STEPS + 1))

    path = GOLDEN / f"{name}.json"
    if request.config.getoption("--update-golden"):
        record = {**recorded_overrides(name), "commit": commit(), "steps": got}
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    update = (
        "if the change is meant, record the new values with `python -m pytest "
        f"'{request.node.nodeid}' --update-golden` and say in the commit why they moved"
    )
    assert path.is_file(), f"{path} does not exist: {update}"
    record = json.loads(path.read_text())
    made = {k: record.get(k) for k in recorded_overrides(name)}
    assert made == recorded_overrides(name), (
        f"{path} was recorded with other overrides ({made}); {update}"
    )
    differ = mismatches(record["steps"], got)
    if differ:
        pytest.fail(
            f"{name}: the first steps left the trajectory recorded at {record['commit']}:\n  "
            + "\n  ".join(differ)
            + f"\n{update}",
            pytrace=False,
        )
