"""JSONL and W&B loggers. W&B runs offline here: no network, a second or two per run."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from wandb_file import run_contents

from biencoder.training.loggers import JsonlLogger, MultiLogger, WandbLogger, resolve_wandb_mode


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ JSONL


def test_jsonl_writes_one_flushed_line_per_call(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"train/loss": torch.tensor(0.5), "train/lr": np.float32(0.25)}, step=1)
    # Readable before finish(): every line is on disk when log() returns.
    assert [(r["step"], r["train/loss"], r["train/lr"]) for r in read_jsonl(path)] == [
        (1, 0.5, 0.25)
    ]
    logger.log({"eval/ndcg@10": 0.3, "epoch": 2}, step=2)
    logger.finish()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["epoch"] == 2 and isinstance(records[1]["time"], float)


def test_jsonl_refuses_reserved_names_non_numbers_and_use_after_finish(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="reserved"):
        logger.log({"step": 3}, step=3)
    with pytest.raises(TypeError, match="expected a number"):
        logger.log({"name": "x"}, step=3)
    logger.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        logger.log({"loss": 1.0}, step=4)


def test_jsonl_resume_drops_lines_past_the_checkpoint_and_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 6):
        logger.log({"loss": 1.0 / step}, step=step)
    logger.finish()
    with path.open("a") as f:
        f.write('{"step": 6, "loss": 0.1')  # the crash cut this line short

    resumed = JsonlLogger(path, resume_step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    resumed.log({"loss": 0.3}, step=4)
    resumed.finish()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".*"))


def test_jsonl_reopened_without_resume_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        logger = JsonlLogger(path)
        logger.log({"loss": 1.0}, step=step)
        logger.finish()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_jsonl_summary_merges_into_a_json_file(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.summary({"test/ndcg@10": 0.6})
    logger.summary({"test/recall@100": 0.9, "test/ndcg@10": 0.7})
    assert json.loads((tmp_path / "metrics.summary.json").read_text()) == {
        "test/ndcg@10": 0.7,
        "test/recall@100": 0.9,
    }


def test_multi_logger_fans_out_and_finishes_all_despite_a_failure(tmp_path):
    class Broken:
        def log(self, metrics, step): ...

        def summary(self, metrics): ...

        def finish(self):
            raise OSError("disk gone")

    first, last = JsonlLogger(tmp_path / "a.jsonl"), JsonlLogger(tmp_path / "b.jsonl")
    multi = MultiLogger([first, Broken(), last])
    multi.log({"loss": 1.0}, step=7)
    multi.summary({"best": 2.0})
    with pytest.raises(OSError, match="disk gone"):
        multi.finish()
    for name in ("a", "b"):
        assert read_jsonl(tmp_path / f"{name}.jsonl")[0]["step"] == 7
        assert json.loads((tmp_path / f"{name}.summary.json").read_text()) == {"best": 2.0}
    assert last._file is None


# ------------------------------------------------------------------------------ W&B mode


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def test_mode_explicit_then_env_then_key_then_offline(no_wandb_env, tmp_path):
    assert resolve_wandb_mode(None)[0] == "offline"
    assert resolve_wandb_mode("disabled") == ("disabled", "asked for")

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    no_wandb_env.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode(None) == ("online", f"{netrc} has a key for api.wandb.ai")

    no_wandb_env.setenv("NETRC", str(tmp_path / "no-netrc"))
    no_wandb_env.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(None) == ("online", "WANDB_API_KEY is set")
    no_wandb_env.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(None) == ("offline", "from WANDB_MODE")


# ------------------------------------------------------------------------------ W&B runs


def test_wandb_offline_run_records_metrics_summary_and_resumes(no_wandb_env, tmp_path):
    no_wandb_env.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(
        "biencoder-tests", tmp_path, {"lr": 1e-3, "batch_size": 8}, name="tiny", tags=["test"]
    )
    assert logger.mode == "offline"
    logger.log({"train/loss": 1.5, "train/lr": torch.tensor(0.5)}, step=10)
    logger.log({"eval/ndcg@10": 0.25}, step=20)
    logger.summary({"test/ndcg@10": 0.75})
    logger.finish()
    logger.finish()

    (folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{logger.run_id}")
    run = run_contents(folder)
    assert run["id"] == logger.run_id
    assert run["config"]["lr"] == 1e-3 and run["config"]["batch_size"] == 8
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]]
    assert rows == [
        {"train/loss": 1.5, "train/lr": 0.5, "step": 10},
        {"eval/ndcg@10": 0.25, "step": 20},
    ]
    assert run["summary"]["test/ndcg@10"] == 0.75
    assert run["metrics"] == {"step": "", "*": "step"}

    resumed = WandbLogger("biencoder-tests", tmp_path, {"lr": 1e-3}, run_id=logger.run_id)
    resumed.log({"train/loss": 1.25}, step=15)
    resumed.finish()
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{logger.run_id}*"))
    assert len(folders) == 2  # one folder per process; `wandb sync` joins them into one run
    assert written_history(folders[-1])[0]["step"] == 15


def written_history(run_folder, timeout: float = 30.0) -> list[dict]:
    """The run's history once wandb's service process has written it: when a resumed run
    starts in the same second as the first, its folder gets a "-1" suffix and its records
    reach the file a moment after finish() returns."""
    deadline = time.monotonic() + timeout
    while not (history := run_contents(run_folder)["history"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return history


def test_wandb_online_without_a_key_falls_back_to_offline(no_wandb_env, tmp_path):
    logger = WandbLogger("biencoder-tests", tmp_path, {}, mode="online", run_id="fallback1")
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert logger.mode == "offline" and logger.run_id == "fallback1"
    assert list((tmp_path / "wandb").glob("offline-run-*-fallback1"))
