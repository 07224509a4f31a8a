"""Training checkpoints that survive a crash at any point.

A checkpoint is a folder ``root/<name>/`` holding the model as ``BiEncoder.save_pretrained``
writes it, ``trainer_state.pt`` (whatever the trainer passes: optimizer, scheduler, RNG and
sampler states, step, best metric, W&B run id) and ``checkpoint.json`` (``{"step", "name"}``,
cheap to read). It is written into ``root/.tmp-<name>-<uuid>/``, fsync'd, then renamed into
place; an existing ``root/<name>`` (``last``, ``best``) is first renamed aside to
``root/.old-<name>-<uuid>/`` and deleted once the new one is in. A crash therefore leaves
the old or the new folder complete, or, between the two renames, only the ``.old-`` one,
which ``latest_checkpoint`` also considers.

``trainer_state.pt`` is loaded with ``weights_only=False`` because RNG states and optimizer
dicts are arbitrary pickles: load only checkpoints you wrote yourself.

    save_checkpoint(root, f"step-{step:08d}", model, {"step": step, "rng": rng_state(), ...})
    path = latest_checkpoint(root)
    if path is not None:
        model = BiEncoder.from_pretrained(path)
        state = load_trainer_state(path)
        set_rng_state(state["rng"])
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from model import BiEncoder

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"
STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def save_checkpoint(root: Path, name: str, model: BiEncoder, state: dict[str, Any]) -> Path:
    """Write ``model`` and ``state`` to ``root/name`` atomically and return that folder.

    ``state["step"]`` (an int) is required: it orders checkpoints for ``latest_checkpoint``.
    An existing ``root/name`` is replaced only once the new folder is complete on disk.
    """
    root = Path(root)
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"checkpoint name {name!r} must be a plain folder name not starting '.'")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"state['step'] must be an int, got {step!r}")
    root.mkdir(parents=True, exist_ok=True)

    tmp = root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
    model.save_pretrained(tmp)
    torch.save(state, tmp / TRAINER_STATE)
    # Written last: a folder with checkpoint.json was complete when it was renamed in.
    (tmp / CHECKPOINT_META).write_text(json.dumps({"step": step, "name": name}) + "\n")
    _fsync_tree(tmp)

    final = root / name
    old = None
    if final.exists():
        old = root / f"{_OLD_PREFIX}{name}-{uuid.uuid4().hex}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        _delete_checkpoint(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint under ``root`` with the highest step, or None.

    Complete means ``checkpoint.json`` and ``trainer_state.pt`` are present; ``.tmp-``
    folders (unfinished writes) never count, ``.old-`` ones (complete checkpoints caught
    between the two renames of a replacement) do. On equal steps a regular folder wins.
    """
    found = _complete_checkpoints(Path(root))
    if not found:
        return None
    best = max(found, key=lambda c: (c.step, not c.is_old, c.path.name))
    return best.path


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Unpickle ``trainer_state.pt`` from checkpoint folder ``path`` onto the CPU.

    Uses ``weights_only=False`` (RNG states and optimizer dicts need it), which can run code
    from the file: only load trusted, locally written checkpoints.
    """
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (a temporary file renamed into place), so
    that a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global, torch's CPU and all CUDA generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by ``rng_state``.

    CUDA states are restored for the devices present in both the saved state and this
    machine; a different device count is logged, as draws on the others will differ.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != available:
        log.warning(
            "checkpoint has CUDA RNG states for %d devices, this machine has %d; "
            "restoring the first %d",
            len(cuda_states),
            available,
            min(len(cuda_states), available),
        )
    for device, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state, device)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-step ``step-*`` checkpoints, and stale leftovers.

    Other names (``last``, ``best``) are never pruned, nor is the ``latest_checkpoint``.
    A ``.tmp-``/``.old-`` folder or an incomplete ``step-*`` one is stale, and deleted, only
    when a complete regular checkpoint is newer: by step where the folder says its step,
    else by modification time (so a write in progress elsewhere is left alone).
    Returns the deleted folders.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    root = Path(root)
    if not root.is_dir():
        return []
    complete = _complete_checkpoints(root)
    regular = [c for c in complete if not c.is_old]
    latest = latest_checkpoint(root)
    doomed: list[Path] = []

    steps = sorted(
        (c for c in regular if c.path.name.startswith(STEP_PREFIX)),
        key=lambda c: (c.step, c.path.name),
        reverse=True,
    )
    doomed += [c.path for c in steps[keep:] if c.path != latest]

    complete_paths = {c.path for c in regular}
    newest_step = max((c.step for c in regular), default=None)
    newest_mtime = max((c.mtime for c in regular), default=None)
    for entry in sorted(root.iterdir()):
        leftover = entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX, STEP_PREFIX))
        if not entry.is_dir() or not leftover or entry in complete_paths or entry == latest:
            continue
        step = _read_step(entry)
        if step is not None and newest_step is not None:
            stale = newest_step >= step
        else:
            stale = newest_mtime is not None and newest_mtime > _last_modified(entry)
        if stale:
            doomed.append(entry)

    for path in doomed:
        _delete_checkpoint(path)
    return doomed


# ------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Found:
    path: Path
    step: int
    is_old: bool
    mtime: float  # of checkpoint.json: when the checkpoint was completed


def _complete_checkpoints(root: Path) -> list[_Found]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) or not entry.is_dir():
            continue
        if not (entry / TRAINER_STATE).is_file():
            continue
        step = _read_step(entry)
        if step is None:
            continue
        mtime = (entry / CHECKPOINT_META).stat().st_mtime
        found.append(_Found(entry, step, entry.name.startswith(_OLD_PREFIX), mtime))
    return found


def _read_step(folder: Path) -> int | None:
    try:
        step = json.loads((folder / CHECKPOINT_META).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _last_modified(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for dirpath, _, filenames in os.walk(folder):
        times += [Path(dirpath, f).stat().st_mtime for f in filenames]
    return max(times)


def _delete_checkpoint(path: Path) -> None:
    # Unlink the marker first: a deletion cut short by a crash leaves no folder that still
    # looks complete.
    (path / CHECKPOINT_META).unlink(missing_ok=True)
    shutil.rmtree(path)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            fd = os.open(Path(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
