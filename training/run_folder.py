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
change only the keys in :data:`CHANGEABLE_ON_RESUME`. The record is data, not code: a
resume replays only what a command line of train.py can have written there
(:func:`check_launch`).

One process writes a run folder at a time: :class:`LockRunFolder` (a Hydra callback in
conf/hydra/default.yaml) takes ``run.lock`` (:mod:`runtime.lock`) before Hydra writes its
``.hydra/``, and train() takes it again (a no-op then) for callers that skip Hydra. Nothing
here deletes through a symbolic link.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from biencoder.runtime import lock
from biencoder.runtime.files import remove
from biencoder.training.checkpoint import write_json
from biencoder.training.distributed import launch_from_env

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


def refuse_linked_run_files(run_dir: Path) -> None:
    """Raise OSError naming the first run file of ``run_dir`` that is a symbolic link
    (checkpoints/ on another disk): what it points to may be another run's, so clearing the
    run deletes nothing through it, and the link alone gone would silently move the new
    run's files onto this disk."""
    for name in existing_run_files(run_dir):
        path = Path(run_dir) / name
        if path.is_symlink():
            raise OSError(
                f"{path} is a symbolic link to {path.resolve()}; trainer.overwrite deletes "
                "nothing through a link: empty or remove it yourself, then run again"
            )


def clear_run(run_dir: Path) -> list[str]:
    """Delete the run files of ``run_dir`` (not Hydra's .hydra/ or log); returns their names.
    A run file that is a link is refused before anything is deleted
    (:func:`refuse_linked_run_files`)."""
    refuse_linked_run_files(run_dir)
    removed = existing_run_files(run_dir)
    for name in removed:
        remove(Path(run_dir) / name)
    return removed


def write_launch(run_dir: Path, launch: Launch) -> None:
    write_json(Path(run_dir) / LAUNCH, asdict(launch))


def read_launch(run_dir: Path) -> Launch | None:
    """The run's launch record, or None for a folder written before launch.json existed.
    Raises ValueError naming the file and the field when it is not one train.py writes."""
    path = Path(run_dir) / LAUNCH
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a launch record: invalid JSON ({err})") from err
    problem = _launch_problem(raw)
    if problem:
        raise ValueError(f"{path}: not a launch record: {problem}")
    return Launch(overrides=raw["overrides"], choices=raw["choices"])


def _launch_problem(raw: Any) -> str | None:
    if not isinstance(raw, dict) or set(raw) != {"overrides", "choices"}:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        return f"expected the keys choices and overrides, found {keys}"
    overrides, choices = raw["overrides"], raw["choices"]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return "overrides: expected a list of strings"
    if not isinstance(choices, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in choices.items()
    ):
        return "choices: expected a mapping of group names to option names"
    return None


# Hydra's instantiate directives that name code to run, or arguments to run it with.
_CODE_DIRECTIVES = frozenset(("_target_", "_args_"))
_TARGET_LINE = re.compile(r"^\s*_target_:\s*([\w.]+)\s*$", re.MULTILINE)


def config_targets(config_dir: str | os.PathLike[str]) -> frozenset[str]:
    """Every ``_target_`` the shipped configs name: the code a config may run."""
    return frozenset(
        match
        for path in Path(config_dir).rglob("*.yaml")
        for match in _TARGET_LINE.findall(path.read_text(encoding="utf-8"))
    )


def config_groups(config_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Each config group of ours (``loss``, ``evaluation/index``) and its options; Hydra's
    own groups (``hydra/...``) are left out, their options live in Hydra."""
    root = Path(config_dir)
    groups: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and not group.startswith("hydra"):
            groups.setdefault(group, []).append(path.stem)
    return groups


def check_launch(
    launch: Launch,
    path: Path,
    groups: dict[str, list[str]],
    targets: frozenset[str],
    command_line: list[str],
) -> None:
    """Refuse a launch record a run of train.py cannot have written, before it is replayed:
    an override that does not parse, one that sets an instantiate directive (``_target_``
    and the like) to code the shipped configs do not name (unless this command line gives
    the same override again), a group choice that is not one of ``groups``' options. The
    message names ``path`` and the entry."""
    parser = OverridesParser.create()
    for index, text in enumerate(launch.overrides):
        where = f"{path}: overrides[{index}] {text!r}"
        try:
            (override,) = parser.parse_overrides([text])
        except (OverrideParseException, ValueError) as err:
            raise ValueError(f"{where}: not a command-line override ({err})") from err
        key = override.key_or_group
        parts = key.split(".")
        if text in command_line or not _CODE_DIRECTIVES.intersection(parts):
            continue
        value = override.value()
        if parts[-1] == "_target_" and isinstance(value, str) and value in targets:
            continue
        raise ValueError(
            f"{where}: sets {key}, which names code to run, to a value no shipped config "
            "uses; a resumed run replays it only when the resume command line gives the "
            "same override again"
        )
    for group, options in groups.items():
        choice = launch.choices.get(group)
        if choice is not None and choice not in options:
            raise ValueError(
                f"{path}: choices.{group}: {choice!r} is not one of {', '.join(options)}"
            )


class LockRunFolder(Callback):
    """Takes the run folder's lock (:mod:`runtime.lock`) before Hydra writes its ``.hydra/``
    into it, so that a second process started into the same ``hydra.run.dir`` fails before
    it changes a byte there; released when the run ends. Ranks other than 0 of a
    multi-process run (torchrun, or SLURM tasks) leave it to rank 0. A folder that is
    locked, or cannot be, ends the command with exit status 1 and the reason."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            launched = launch_from_env(os.environ)
        except ValueError:
            launched = None  # init_distributed says what is wrong, once the job starts
        if launched is not None and launched.rank != 0:
            return
        try:
            lock.acquire(run_lock_path(Path(config.hydra.run.dir)), "hydra.run.dir")
        except (lock.LockedError, OSError) as err:
            # Hydra turns a callback's exception into a warning and goes on to write the
            # folder: only an exit stops it.
            raise SystemExit(f"{type(err).__name__}: {err}") from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        lock.release(run_lock_path(Path(config.hydra.run.dir)))


def run_lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / lock.LOCK_NAME


def override_key(override: str) -> str:
    """The key an override sets: ``optim.lr`` for ``optim.lr=1e-4``, ``loss`` for
    ``loss=triplet``, ``trainer.max_steps`` for ``+trainer.max_steps=5``."""
    return override.split("=", 1)[0].lstrip("+~")


def changeable_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in CHANGEABLE_ON_RESUME)
