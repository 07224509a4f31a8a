"""train.py's config as tests compose it, and the overrides that shrink a run to seconds."""

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from biencoder.training.hydra_config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register()


def run_entry(script: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python SCRIPT OVERRIDES`` from the repository root, as a user runs it; the test
    fails with the command's stderr unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def compose_config(name: str, *overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config ``python <name>.py OVERRIDES`` composes; ``hydra_config`` keeps the
    ``hydra`` node (launcher, sweeper, run folder)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_config)


def compose_train(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """train.py's config. The trainer profile is pinned to ``cpu`` unless an override names
    one: tests check behaviour, which must not depend on whether the machine has a GPU."""
    if not any(o.startswith("trainer=") for o in overrides):
        overrides = ("trainer=cpu", *overrides)
    return compose_config("train", *overrides, hydra_config=hydra_config)


def tiny_overrides(model_path: str, data: str = "beir", *extra: str) -> list[str]:
    """``debug=tiny`` (2 steps of 4 examples on data/bundled/tiny) with the tiny model;
    ``data="sts"`` trains and evaluates on STS (``experiment=sts``) instead of SciFact."""
    experiment = ["experiment=sts"] if data == "sts" else []
    return [*experiment, "debug=tiny", f"model.path={model_path}", *extra]
