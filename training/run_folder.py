"""What a run folder holds, and the rules that keep two runs from mixing in one.

A training run writes its files (checkpoints, metrics, mined negatives, W&B files) into one
folder, ``hydra.run.dir``. A second run started into a folder that already holds a run
would prune the first one's checkpoints, interleave its metric lines with the old ones and
make a later resume continue the wrong run, so train.py refuses it unless told to continue
(``trainer.resume=true``) or to start over (``trainer.overwrite=true``, which clears the old
run's files first).

``launch.json`` records how the run was started (its command-line overrides and the config
group choices), so that ``trainer.resume=true`` continues with the run's own configuration
rather than whatever the resume command line composes; overrides given at resume time may
change only the keys in :data:`CHANGEABLE_ON_RESUME`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from biencoder.training.checkpoint import write_json

LAUNCH = "launch.json"
# Everything a training run writes besides Hydra's own .hydra/ folder and log file.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "metrics.summary.json",
    "metrics.json",
    "run.trec",
    "hard_negatives.json",
    LAUNCH,
    "wandb",
)
# What may differ between a run and its resumption: how long it goes on, how it logs and
# saves, where it runs, and whether it is evaluated at the end. Anything else would make the
# resumed steps train another model than the first ones did.
CHANGEABLE_ON_RESUME = (
    "trainer.resume",
    "trainer.max_steps",
    "trainer.epochs",
    "trainer.log_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.eval",
    "device",
    "logger",
    "hydra",
)


@dataclass(frozen=True)
class Launch:
    """How a run was started: its command-line overrides, and the group choices they and the
    machine led to (the trainer profile is picked by the machine when not named)."""

    overrides: list[str]
    choices: dict[str, str | None]


def existing_run_files(run_dir: Path) -> list[str]:
    """The names of the run files already in ``run_dir`` (empty for a fresh folder; an
    empty folder, such as a checkpoints/ prepared in advance, holds no run)."""
    found = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def clear_run(run_dir: Path) -> list[str]:
    """Delete the run files of ``run_dir`` (not Hydra's .hydra/ or log); returns their names."""
    removed = existing_run_files(run_dir)
    for name in removed:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def write_launch(run_dir: Path, launch: Launch) -> None:
    write_json(Path(run_dir) / LAUNCH, asdict(launch))


def read_launch(run_dir: Path) -> Launch | None:
    """The run's launch record, or None for a folder written before launch.json existed."""
    path = Path(run_dir) / LAUNCH
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Launch(overrides=list(raw["overrides"]), choices=dict(raw["choices"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a launch record ({err})") from err


def override_key(override: str) -> str:
    """The key an override sets: ``optim.lr`` for ``optim.lr=1e-4``, ``loss`` for
    ``loss=triplet``, ``trainer.max_steps`` for ``+trainer.max_steps=5``."""
    return override.split("=", 1)[0].lstrip("+~")


def changeable_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in CHANGEABLE_ON_RESUME)
