"""bench/device_check.sh rehearsed on CPU as the GPU machine would run it.

The GPU image lacks hydra, omegaconf, faiss and wandb; a sitecustomize.py on PYTHONPATH
makes importing them fail in every process the script starts, so the rehearsal meets the
same missing modules. The check is that every stage ends with a result or a one-line
reason, and that the report holds each stage's section.
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
STAGES = ("wheels", "ceilings", "pytest", "kernels", "tiles", "train")

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
    for impl in ("naive", "compiled", "torch", "triton", "triton_recompute"):
        row = rf"\| {impl} \| symmetric \| plain \| 32 \| 32 \| 16 \| bf16 \| \d"
        assert re.search(row, report), impl
    # Every sweep of the tile benchmark ran its default.
    for sweep in ("forward", "forward + stats", "probs", "chunk"):
        default_row = rf"\| {re.escape(sweep)} \| [^|]*\(default\) \| [\d.]+ \| 1.00× \|"
        assert re.search(default_row, report), sweep
    assert "| training job | steps | examples/s | tokens/s |" in report
    assert re.search(r"\| ours: train_step \+ InfoNCETask, GradCache \| \d+ \|", report)
    assert re.search(r"\| sentence-transformers: CachedMultipleNegativesRankingLoss \| \d+", report)
    assert re.search(r"\| ours: BiEncoder.encode \| [\d,]+ \|", report)
    assert re.search(r"Profile of one step, ours: .*\n\n```text\none step: [\d.]+ s wall", report)


def test_modules_missing_on_the_gpu_image_skip_cleanly(rehearsal):
    _, out = rehearsal
    pytest_section = (out / "pytest.md").read_text()
    assert "tests/test_search.py: needs faiss, which is not installed" in pytest_section
    assert re.search(r"tests/test_train.py: needs (hydra|omegaconf), which is not", pytest_section)
    assert not re.search(r"^ERROR|\berrors?\b in ", pytest_section, re.MULTILINE)


@pytest.mark.parametrize("prefetch", [True, False])
def test_gpu_train_tokenizes_ours_as_the_trainer_does(tmp_path, monkeypatch, prefetch):
    """bench/gpu_train.py's job for ours tokenizes the next batch on the prefetch thread
    (Trainer's default), or with --no-prefetch on the caller's thread."""
    import threading

    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import gpu_train

    flags = "--device cpu --batch-size 4 --chunk-size 2 --layers 1 --hidden 32 --heads 4"
    flags += " --intermediate 64 --vocab-size 200 --query-words 2 3 --doc-words 3 4"
    args = gpu_train._parse_args([*flags.split(), *([] if prefetch else ["--no-prefetch"])])
    threads = []
    tokenize = gpu_train.tokenize_batch

    def recording(*a, **k):
        threads.append(threading.current_thread().name)
        return tokenize(*a, **k)

    monkeypatch.setattr(gpu_train, "tokenize_batch", recording)
    folder = gpu_train.build_model_folder(tmp_path, args)
    pairs = gpu_train.make_pairs(16, args)
    step = gpu_train.our_step(folder, torch.device("cpu"), None, args, iter([pairs[:4]] * 3))
    try:
        assert step() > 0
    finally:
        step.close()
    assert threads
    on_helper = [name.startswith("prefetch") for name in threads]
    assert all(on_helper) if prefetch else not any(on_helper)


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
        "LIMIT_TILES": "14",
        "LIMIT_TRAIN": "15",
        "INFONCE_ARGS": "--sizes 48",
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
    for stage, limit in [("ceilings", 11), ("pytest", 12), ("kernels", 33), ("tiles", 14)]:
        assert f"== {stage} (limit {limit} s)" in completed.stdout, stage
    assert "== train (limit 15 s)" in completed.stdout
    recorded = calls.read_text().splitlines()
    kernels = next(line for line in recorded if line.startswith("bench/infonce.py --device"))
    tiles = next(line for line in recorded if line.startswith("bench/infonce_tiles.py"))
    train = next(line for line in recorded if line.startswith("bench/gpu_train.py"))
    # The kernels stage's --budget is its limit less 15 s; the defaults are replaced.
    assert "--budget 18 --sizes 48 --out" in kernels and "--dims" not in kernels
    assert "--size 40 --out" in tiles and "--size 64" not in tiles
    assert "--seconds 2 --out" in train and "--batch-size" not in train
