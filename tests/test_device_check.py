"""bench/device_check.sh rehearsed on CPU as the GPU machine would run it.

The GPU image lacks hydra, omegaconf, faiss and wandb; a sitecustomize.py on PYTHONPATH
makes importing them fail in every process the script starts, so the rehearsal meets the
same missing modules. The check is that every stage ends with a result or a one-line
reason, and that the report holds each stage's section. The rehearsal takes a minute on 2
cores, so its tests are ``slow``: run ``pytest -m slow tests/test_device_check.py`` before
a session's device call.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("wheels", "ceilings", "pytest", "kernels", "compiled", "tiles", "train")
# The rehearsal's training batch sizes (bench/device_check.sh --cpu), and the jobs at each.
TRAIN_BATCHES = (8, 16)
TRAIN_JOBS = (
    "ours: Trainer step, GradCache by texts",
    "ours: Trainer step, GradCache by tokens",
    "sentence-transformers: CachedMultipleNegativesRankingLoss",
)
NUMBER = r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?"

BLOCKER = '''
import importlib.util
import sys


class _MissingOnGpuImage:
    """Import of a module the GPU image lacks fails as if it were not installed."""

    NAMES = {"hydra", "omegaconf", "faiss", "wandb"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _MissingOnGpuImage())

# Libraries probe for optional packages with importlib.util.find_spec (accelerate asks for
# wandb when transformers imports it), which answers None for an absent package.
_find_spec = importlib.util.find_spec


def _absent_find_spec(name, package=None):
    if name.split(".")[0] in _MissingOnGpuImage.NAMES:
        return None
    return _find_spec(name, package)


importlib.util.find_spec = _absent_find_spec
'''


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path_factory.mktemp("out")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO_ROOT)]),
        "OUT": str(out),
        # Here hydra is installed and registers a pytest plugin that imports it; on the
        # GPU image there is no such plugin to load.
        "PYTEST_ADDOPTS": "-p no:hydra_pytest",
    }
    env.pop("TRITON_INTERPRET", None)
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "device_check.sh"), "--cpu"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return completed, out


def _summary_rows(report: str) -> dict[str, list[str]]:
    section = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)
    }


def test_blocker_hides_the_modules(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    completed = subprocess.run(
        [sys.executable, "-c", "import faiss"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert "No module named 'faiss'" in completed.stderr


def test_help_and_unknown_arguments():
    script = str(REPO_ROOT / "bench" / "device_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--cpu" in shown.stdout
    refused = subprocess.run(["bash", script, "--gpu"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown argument: --gpu" in refused.stderr


# A minute or more on 2 shared cores: the whole suite is collected once more, and
# torch.compile and the Triton interpreter run.
@pytest.mark.slow
def test_every_stage_reports_a_result_or_a_reason(rehearsal):
    completed, out = rehearsal
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = _summary_rows(report)
    assert list(rows) == list(STAGES)
    for stage, (status, seconds, result) in rows.items():
        assert re.fullmatch(r"ok|skipped: .+|failed: .+", status), (stage, status)
        assert seconds.isdigit(), (stage, seconds)
        assert status.startswith("skipped") or result != "–", (stage, result)
    # The script prints the summary table last.
    table = completed.stdout.rstrip().splitlines()[-len(STAGES) - 2 :]
    assert table[0] == "| stage | status | seconds | result |"
    assert [line.split("|")[1].strip() for line in table[2:]] == list(STAGES)


@pytest.mark.slow
def test_report_sections(rehearsal):
    _, out = rehearsal
    report = (out / "report.md").read_text()
    for stage in STAGES:
        assert f"\n## {stage}\n" in report
        if stage != "wheels":
            assert (out / f"{stage}.log").is_file()
    assert "| bf16_tflops |" in report
    assert "| impl | problem | variant | B | N | D | dtype | fwd+bwd ms |" in report
    assert "Largest B that ran" in report
    # Inf-CL needs CUDA: its rows are replaced by a reason.
    assert "inf_cl: skipped: " in report
    kernels = (out / "kernels.md").read_text()
    for impl in ("naive", "torch", "triton", "triton_recompute"):
        row = rf"\| {impl} \| symmetric \| plain \| 32 \| 32 \| 16 \| bf16 \| \d"
        assert re.search(row, kernels), impl
    # torch.compile has a stage of its own, beside the naive loss it is compared with.
    assert "| compiled |" not in kernels
    compiled = (out / "compiled.md").read_text()
    for impl in ("naive", "compiled"):
        row = rf"\| {impl} \| in_batch \| plain \| 32 \| 32 \| 16 \| bf16 \| \d"
        assert re.search(row, compiled), impl
    assert re.search(r"first calls \(64 rows.*compiled in_batch D=16 bf16 [\d.]+ s", compiled)
    # Every sweep of the tile benchmark ran its default.
    for sweep in ("forward", "forward + stats", "probs", "chunk"):
        default_row = rf"\| {re.escape(sweep)} \| [^|]*\(default\) \| [\d.]+ \| 1.00× \|"
        assert re.search(default_row, report), sweep
    header = "| training job | batch | steps | examples/s | tokens/s | s/step | peak GiB |"
    assert header in report
    train = (out / "train.md").read_text()
    for batch in TRAIN_BATCHES:
        for job in TRAIN_JOBS:
            row = rf"\| {re.escape(job)} \| {batch} \| \d+ \| {NUMBER} \| {NUMBER} \|"
            assert re.search(row, train), (job, batch)
        for job in TRAIN_JOBS[:2]:
            # Ours: the busy share of the profiled step and one synchronisation per step
            # (the Trainer's one read of the loss and gradient norm), then the ratio to ST.
            row = rf"\| {re.escape(job)} \| {batch} \|.* \| \d+%: [^|]+ \| 1 \| {NUMBER}× \|$"
            assert re.search(row, train, re.MULTILINE), (job, batch)
        assert f"Profile of one step, {TRAIN_JOBS[0]}, batch {batch}:" in train
    assert re.search(r"\| ours: BiEncoder.encode \| [\d,]+ \|", report)
    assert re.search(r"Profile of one step, ours: .*\n\n```text\none step: [\d.]+ s wall", report)


def _summary_numbers(rows: dict[str, list[str]]) -> dict[str, str]:
    return {stage: cells[2] for stage, cells in rows.items()}


@pytest.mark.slow
def test_summaries_state_the_targets(rehearsal):
    """The summary table's lines for the kernels and the training stages carry every number
    the targets are judged by; a number missing (a job that did not run, a profile cut)
    fails here."""
    _, out = rehearsal
    results = _summary_numbers(_summary_rows((out / "report.md").read_text()))
    kernels = results["kernels"]
    fused = re.search(
        rf"fused fwd\+bwd B=32 N=32 D=16 bf16 in_batch: ({NUMBER}) ms, {NUMBER} TFLOP/s"
        rf" = ({NUMBER})% of the measured bf16 matmul {NUMBER} TFLOP/s"
        r" \(target ≥ 50%: (met|missed)\)",
        kernels,
    )
    assert fused, kernels
    assert re.search(r"compiled [\d.]+ ms \(compiled in \d+ s\)", results["compiled"])
    assert re.search(r"naive [\d.]+ ms", results["compiled"])
    assert re.search(r"forward: default \d+×\d+×\d+ w\d s\d [\d.]+ ms", results["tiles"])
    train = results["train"]
    per_batch = dict(re.findall(r"B=(\d+): (.*?)(?=\. B=\d+: |\. encode |$)", train))
    assert sorted(map(int, per_batch)) == list(TRAIN_BATCHES), train
    for batch, clauses in per_batch.items():
        assert re.search(rf"^ST {NUMBER} ex/s;", clauses), (batch, clauses)
        for name in ("ours", "ours by tokens"):
            clause = re.search(
                rf"; {name} ({NUMBER}) ex/s = ({NUMBER})× ST \(≥ 1.5×: (met|missed)\),"
                rf" CPU busy (\d+)% \(≥ 80%: (met|missed)\), (\d+) syncs?/step",
                clauses,
            )
            assert clause, (batch, name, clauses)
            ratio, busy = float(clause[2]), int(clause[4])
            assert (clause[3] == "met") == (ratio >= 1.5), clause[0]
            assert (clause[5] == "met") == (busy >= 80), clause[0]
            assert 0 < busy <= 100 and clause[6] == "1", clause[0]
    assert "missing" not in train and "skipped" not in train, train


@pytest.mark.slow
def test_modules_missing_on_the_gpu_image_skip_cleanly(rehearsal):
    _, out = rehearsal
    pytest_section = (out / "pytest.md").read_text()
    assert "tests/test_search.py: needs faiss, which is not installed" in pytest_section
    assert re.search(r"tests/test_train.py: needs (hydra|omegaconf), which is not", pytest_section)
    assert not re.search(r"^ERROR|\berrors?\b in ", pytest_section, re.MULTILINE)


def _gpu_train(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import gpu_train

    return gpu_train


TINY_TRAIN = (
    "--device cpu --batch-sizes 4 --chunk-size 2 --chunk-tokens 12 --layers 1 --hidden 32"
    " --heads 4 --intermediate 64 --vocab-size 200 --query-words 2 3 --doc-words 3 4"
)


@pytest.mark.parametrize("prefetch", [True, False])
def test_gpu_train_tokenizes_ours_as_the_trainer_does(tmp_path, monkeypatch, prefetch):
    """bench/gpu_train.py's jobs for ours tokenize the next batch on the prefetch thread
    (Trainer's default), or with --no-prefetch on the caller's thread; a step synchronises
    once, and the token-budget job cuts its chunks by tokens."""
    import threading

    gpu_train = _gpu_train(monkeypatch)
    flags = [*TINY_TRAIN.split(), *([] if prefetch else ["--no-prefetch"])]
    args = gpu_train._parse_args(flags)
    calls = []
    tokenize = gpu_train.tokenize_batch

    def recording(*a, **k):
        calls.append((threading.current_thread().name, a[2:]))
        return tokenize(*a, **k)

    monkeypatch.setattr(gpu_train, "tokenize_batch", recording)
    folder = gpu_train.build_model_folder(tmp_path, args)
    pairs = gpu_train.make_pairs(16, args)
    for by_tokens in (False, True):
        job = gpu_train.our_job(
            folder, torch.device("cpu"), None, args, 4, pairs, by_tokens=by_tokens
        )
        try:
            assert job.step() > 0
            assert job.step() > 0  # the first step creates the optimiser state
            assert gpu_train.count_syncs(job).count == 1
        finally:
            job.close()
    on_helper = [name.startswith("prefetch") for name, _ in calls]
    assert on_helper and (all(on_helper) if prefetch else not any(on_helper))
    # (chunk_size, chunk_tokens) of the calls (chunk_size, max_length, chunk_tokens).
    assert {(a[0], a[2]) for _, a in calls} == {(2, None), (None, 12)}


@pytest.mark.parametrize("by_tokens", [False, True])
def test_gpu_train_step_is_the_trainers(tmp_path, monkeypatch, by_tokens):
    """Our job in bench/gpu_train.py mirrors ``Trainer.train_one_step`` (the Trainer itself
    imports faiss, which the GPU image lacks): from the same weights, two steps on the
    sampler's first two batches leave exactly the weights two Trainer steps leave."""
    import functools

    from tqdm.auto import tqdm

    from biencoder.data.training_sets import TrainingSet
    from biencoder.evaluation.config import EvalConfig
    from biencoder.model.biencoder import BiEncoder
    from biencoder.training.config import TrainerConfig
    from biencoder.training.infonce_task import InfoNCETask
    from biencoder.training.schedules import warmup_schedule
    from biencoder.training.trainer import Trainer

    gpu_train = _gpu_train(monkeypatch)
    args = gpu_train._parse_args([*TINY_TRAIN.split(), "--no-prefetch"])
    folder = gpu_train.build_model_folder(tmp_path, args)
    pairs = gpu_train.make_pairs(16, args)
    job = gpu_train.our_job(folder, torch.device("cpu"), None, args, 4, pairs, by_tokens=by_tokens)
    chunking = {"cache_chunk_tokens": 12} if by_tokens else {"cache_chunk_size": 2}
    trainer = Trainer(
        BiEncoder.from_pretrained(folder, max_length=args.max_length).train(),
        InfoNCETask(temperature=gpu_train.TEMPERATURE, impl=args.loss_impl),
        TrainingSet(pairs),
        TrainerConfig(batch_size=4, max_steps=10, precision="fp32", prefetch=False, **chunking),
        EvalConfig(),
        functools.partial(torch.optim.AdamW, lr=gpu_train.LEARNING_RATE, fused=True),
        functools.partial(warmup_schedule, warmup_ratio=0.0, decay="constant"),
        checkpoints=tmp_path / "checkpoints",
        logger=None,
        seed=0,
        max_length=args.max_length,
    )
    before = [p.detach().clone() for p in job.params]
    batches = iter(trainer.sampler)
    for seed in (1, 2):
        torch.manual_seed(seed)  # the same dropout masks for both
        job.step()
        torch.manual_seed(seed)
        trainer.train_one_step(trainer.prepare_batch(next(batches)), tqdm(disable=True))
    job.close()
    assert len(job.params) == len(trainer.params)
    assert not all(torch.equal(a, b) for a, b in zip(before, job.params, strict=True))
    for ours, theirs in zip(job.params, trainer.params, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("script", ["infonce.py", "infonce_tiles.py", "gpu_train.py"])
def test_benchmark_help(script):
    shown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), "--help"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "--out" in shown.stdout, shown.stderr[-2000:]


def test_gpu_train_batch_sizes_and_profile_arguments(monkeypatch):
    gpu_train = _gpu_train(monkeypatch)
    args = gpu_train._parse_args(["--batch-size", "64"])
    assert args.batch_sizes == [64] and args.profile == []
    args = gpu_train._parse_args(["--batch-sizes", "8", "16", "--profile"])
    assert args.batch_sizes == [8, 16] and args.profile == list(gpu_train.SYSTEMS)
    args = gpu_train._parse_args(["--profile", "ours", "ours_tokens"])
    assert args.profile == ["ours", "ours_tokens"]


def test_limits_and_arguments_from_the_environment_reach_their_stages(tmp_path):
    """LIMIT_<STAGE> sets each stage's time limit and <BENCH>_ARGS replaces a benchmark's
    arguments: run with a stand-in python that records the command lines it is given."""
    calls = tmp_path / "calls.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stand_in.chmod(0o755)
    env = {
        **os.environ,
        "PYTHON": str(stand_in),
        "OUT": str(tmp_path / "out"),
        "LIMIT_CEILINGS": "11",
        "LIMIT_PYTEST": "12",
        "LIMIT_KERNELS": "33",
        "LIMIT_COMPILED": "36",
        "LIMIT_TILES": "14",
        "LIMIT_TRAIN": "35",
        "INFONCE_ARGS": "--sizes 48",
        "COMPILED_ARGS": "--sizes 24",
        "TILES_ARGS": "--size 40",
        "TRAIN_ARGS": "--seconds 2",
    }
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "device_check.sh"), "--cpu"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    limits = [("ceilings", 11), ("pytest", 12), ("kernels", 33), ("compiled", 36)]
    limits += [("tiles", 14), ("train", 35)]
    for stage, limit in limits:
        assert f"== {stage} (limit {limit} s)" in completed.stdout, stage
    recorded = calls.read_text().splitlines()
    kernels, compiled = [line for line in recorded if line.startswith("bench/infonce.py --dev")]
    tiles = next(line for line in recorded if line.startswith("bench/infonce_tiles.py"))
    train = next(line for line in recorded if line.startswith("bench/gpu_train.py"))
    # The kernels and compiled stages' --budget is their limit less 15 s, the train stage's
    # less 20 s; the defaults are replaced.
    assert "--budget 18 --sizes 48 --out" in kernels and "--dims" not in kernels
    assert "--out" in kernels and "kernels.md" in kernels
    assert "--budget 21 --sizes 24 --out" in compiled and "compiled.md" in compiled
    assert "--impls" not in compiled
    assert "--size 40 --out" in tiles and "--size 64" not in tiles
    assert "--budget 15 --seconds 2 --out" in train and "--batch-sizes" not in train
