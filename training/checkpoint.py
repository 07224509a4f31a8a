"""Training checkpoints that survive a crash at any point, and that load without running code.

A checkpoint is a folder ``root/<name>/`` holding the model as ``BiEncoder.save_pretrained``
writes it, the trainer state (whatever the trainer passes: optimizer, scheduler, RNG and
sampler states, step, best metric, W&B run id) as ``trainer_state.safetensors`` (its tensors)
and ``trainer_state.json`` (the rest), and ``checkpoint.json`` (``{"step", "name"}``, cheap to
read); it is complete when those three files are there. It is written into
``root/.tmp-<name>-<uuid>/``, fsync'd, then renamed into place; an existing ``root/<name>``
(``last``, ``best``) is first renamed aside to ``root/.old-<name>-<uuid>/`` and deleted once
the new one is in. A crash therefore leaves the old or the new folder complete, or, between
the two renames, only the ``.old-`` one, which ``latest_checkpoint`` also considers. A write
that fails (a full disk, say) removes its ``.tmp-`` folder and leaves the old one as it was.

Nothing in a checkpoint is a pickle, so loading one cannot run code. ``trainer_state.json``
is ``{"version": 1, "state": ...}``; a value that JSON cannot hold is written as an object
with a single tag key (a dict that would read as one is written as ``__dict__``):

    {"__tuple__": [...]}                         tuple (``random.setstate`` wants tuples)
    {"__dict__": [[key, value], ...]}            dict with a key that is not a str, such as
                                                 the parameter indices of optimizer state
    {"__odict__": {"items": [[key, value], ...], "metadata": ...}}
                                                 OrderedDict, with the ``_metadata`` of a
                                                 module's state dict if it has one
    {"__float__": "nan"}                         nan, inf or -inf
    {"__tensor__": "3"}                          tensor: its key in the safetensors file
    {"__ndarray__": {"dtype": "<u4", "shape": [624], "data": "<base64>"}}
                                                 NumPy array, its bytes in base64
    {"__npscalar__": {"dtype": ..., "shape": [], "data": ...}}
                                                 NumPy scalar

Folders written before this format hold ``trainer_state.pt``, a pickle that could run
arbitrary code when loaded. They are never unpickled: ``load_trainer_state`` refuses them
and ``latest_checkpoint`` skips them with a warning.

    check_writable(root)  # at start-up, not at the first checkpoint
    save_checkpoint(root, f"step-{step:08d}", model, {"step": step, "rng": rng_state(), ...})
    path = latest_checkpoint(root)
    if path is not None:
        model = BiEncoder.from_pretrained(path)
        state = load_trainer_state(path)
        set_rng_state(state["rng"])
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import math
import os
import random
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from biencoder.runtime.files import TMP_PREFIX, atomic_write, fsync_dir, fsync_tree, remove

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"
STEP_PREFIX = "step-"
_STATE_FILES = (TRAINER_STATE, TRAINER_TENSORS)
_STATE_VERSION = 1
_OLD_PREFIX = ".old-"
_TAGS = frozenset(
    ("__tuple__", "__dict__", "__odict__", "__float__", "__tensor__", "__ndarray__", "__npscalar__")
)
# A used-up quota (EDQUOT) is a full disk to this user.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint's trainer state that is not loaded: corrupt, truncated, or a pickle."""


def save_checkpoint(
    root: Path,
    name: str,
    model: BiEncoder,
    state: dict[str, Any],
    *,
    min_free_bytes: int | None = None,
) -> Path:
    """Write ``model`` and ``state`` to ``root/name`` atomically and return that folder.

    ``state["step"]`` (an int) is required: it orders checkpoints for ``latest_checkpoint``.
    A value that ``save_trainer_state`` cannot store is refused before anything is written.
    An existing ``root/name`` is replaced only once the new folder is complete on disk.

    The new folder is written before the old one goes, so the disk must take one more
    checkpoint: with less than ``min_free_bytes`` free (by default the size of the largest
    checkpoint already under ``root``) the save is refused up front. That, or running out of
    space or quota while writing, raises ``OSError`` (errno ENOSPC or EDQUOT) saying "no space
    left on device" and naming the checkpoint, after removing the partial folder; the
    checkpoint previously at ``root/name`` is left as it was.
    """
    root = Path(root)
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"checkpoint name {name!r} must be a plain folder name not starting '.'")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"state['step'] must be an int, got {step!r}")
    document, tensors = _encode_state(state)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name

    if min_free_bytes is None:
        sizes = (_folder_size(c.path) for c in _complete_checkpoints(root))
        min_free_bytes = max(sizes, default=0)
    free = shutil.disk_usage(root).free
    if free < min_free_bytes:
        raise _no_space(
            errno.ENOSPC,
            final,
            f"{free} bytes free, a checkpoint takes about {min_free_bytes} (min_free_bytes)",
        )

    tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex}"
    try:
        model.save_pretrained(tmp)
        _write_trainer_state(tmp, document, tensors)
        # Written last: a folder with checkpoint.json was complete when it was renamed in.
        (tmp / CHECKPOINT_META).write_text(json.dumps({"step": step, "name": name}) + "\n")
        fsync_tree(tmp)
    except BaseException as error:
        # Nothing will ever complete this folder, and on a full disk it keeps the disk full.
        shutil.rmtree(tmp, ignore_errors=True)
        code = _space_errno(error)
        if code is not None:
            raise _no_space(code, final, str(error)) from error
        raise

    old = None
    if final.exists():
        old = root / f"{_OLD_PREFIX}{name}-{uuid.uuid4().hex}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        _delete_checkpoint(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint under ``root`` with the highest step, or None.

    Complete means ``checkpoint.json``, ``trainer_state.json`` and
    ``trainer_state.safetensors`` are present; ``.tmp-`` folders (unfinished writes) never
    count, ``.old-`` ones (complete checkpoints caught between the two renames of a
    replacement) do. On equal steps a regular folder wins. A folder in the old pickle format
    (``trainer_state.pt``) is skipped, with a warning if it is at least as recent as the
    result: resuming from it would run code from the file.
    """
    root = Path(root)
    found = _complete_checkpoints(root)
    best = _newest(found)
    complete = {c.path for c in found}
    for legacy in _complete_checkpoints(root, (LEGACY_TRAINER_STATE,)):
        if legacy.path not in complete and (best is None or legacy.step >= best.step):
            log.warning(
                "skipping checkpoint %s (step %d): its %s is in the old format, a pickle "
                "that could run arbitrary code when loaded",
                legacy.path,
                legacy.step,
                LEGACY_TRAINER_STATE,
            )
    return None if best is None else best.path


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` into ``folder`` as ``trainer_state.safetensors`` (its tensors) and
    ``trainer_state.json`` (the rest, encoded as the module docstring says), not fsync'd.

    ``state`` may nest dicts (any hashable keys of the types below), OrderedDicts, lists and
    tuples of None, bool, int, float, str, tensors, NumPy arrays and scalars: what optimizer,
    scheduler and module state dicts and ``rng_state`` hold. Tensors are saved from the CPU,
    contiguous. Anything else raises ``TypeError`` naming where it is, before any writing.
    """
    _write_trainer_state(Path(folder), *_encode_state(state))


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state saved in checkpoint folder ``path``, with its tensors on the CPU:
    equal to what was saved, types included (tuples, int keys, NumPy arrays...).

    Raises ``CheckpointError`` naming the file when a state file is corrupt or truncated, and
    when the folder holds only an old-format ``trainer_state.pt``, which is never unpickled.
    """
    folder = Path(path)
    json_path, tensors_path = folder / TRAINER_STATE, folder / TRAINER_TENSORS
    legacy = folder / LEGACY_TRAINER_STATE
    if not json_path.exists() and legacy.exists():
        raise CheckpointError(
            f"{legacy} is a checkpoint in the old format: a pickle, which could run "
            "arbitrary code when loaded, so it is not loaded. Resume from a checkpoint "
            f"written since ({TRAINER_STATE} + {TRAINER_TENSORS}); to convert one you wrote "
            "yourself and trust, torch.load it with weights_only=False and pass the result "
            "to training.checkpoint.save_trainer_state"
        )
    try:
        document = json.loads(json_path.read_bytes())
    except ValueError as error:  # invalid JSON or UTF-8 both are ValueErrors
        raise CheckpointError(f"{json_path} is corrupt or truncated: {error}") from error
    if not isinstance(document, dict) or document.get("version") != _STATE_VERSION:
        raise CheckpointError(f"{json_path} is not a version {_STATE_VERSION} trainer state")
    try:
        tensors = load_file(tensors_path)
    except SafetensorError as error:
        raise CheckpointError(f"{tensors_path} is corrupt or truncated: {error}") from error
    return _decode_state(document.get("state"), tensors, json_path, tensors_path)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write and delete a small file in it, so that a run
    that could not save its checkpoints fails at start-up instead of at its first one.

    Raises ``OSError`` naming ``folder`` (``PermissionError`` where access is denied).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        try:
            os.write(fd, b"ok")  # creating a file needs no free block, writing one does
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        # OSError() picks the subclass from the errno: EACCES gives a PermissionError.
        raise OSError(error.errno, f"{folder} is not writable: {error.strerror}") from error


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (:func:`runtime.files.atomic_write`), so
    that a crash leaves the old file or the new one, never half of one."""
    atomic_write(path, json.dumps(value))


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
    A ``.tmp-``/``.old-`` folder or an incomplete ``step-*`` one (an old-format one too) is
    stale, and deleted, only when a complete regular checkpoint is newer: by step where the
    folder says its step, else by modification time (so a write in progress elsewhere is
    left alone).
    Returns the deleted folders.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    root = Path(root)
    if not root.is_dir():
        return []
    complete = _complete_checkpoints(root)
    regular = [c for c in complete if not c.is_old]
    newest = _newest(complete)
    latest = None if newest is None else newest.path
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
        leftover = entry.name.startswith((TMP_PREFIX, _OLD_PREFIX, STEP_PREFIX))
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


def _complete_checkpoints(root: Path, state_files: tuple[str, ...] = _STATE_FILES) -> list[_Found]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        if not all((entry / filename).is_file() for filename in state_files):
            continue
        step = _read_step(entry)
        if step is None:
            continue
        mtime = (entry / CHECKPOINT_META).stat().st_mtime
        found.append(_Found(entry, step, entry.name.startswith(_OLD_PREFIX), mtime))
    return found


def _newest(found: list[_Found]) -> _Found | None:
    return max(found, key=lambda c: (c.step, not c.is_old, c.path.name), default=None)


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


def _folder_size(folder: Path) -> int:
    return sum(
        Path(dirpath, f).stat().st_size for dirpath, _, files in os.walk(folder) for f in files
    )


def _delete_checkpoint(path: Path) -> None:
    if path.is_symlink():
        # A checkpoint moved elsewhere and linked back: the run lets go of it (remove takes
        # the link alone), the files it points to are the user's.
        log.warning(
            "%s is a link to %s: removing the link, keeping its files", path, path.resolve()
        )
    else:
        # Unlink the marker first: a deletion cut short by a crash leaves no folder that
        # still looks complete.
        (path / CHECKPOINT_META).unlink(missing_ok=True)
    remove(path)


def _space_errno(error: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when ``error``, or one it was raised from, says the disk is full.

    Errors from Rust writers (safetensors, tokenizers) are no OSErrors: they only carry the
    operating system's words for the errno, e.g. "No space left on device (os error 28)".
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            return error.errno
        message = str(error).lower()
        for code in _NO_SPACE_ERRNOS:
            if os.strerror(code).lower() in message:
                return code
        error = error.__cause__ or error.__context__
    return None


def _no_space(code: int, checkpoint: Path, detail: str) -> OSError:
    return OSError(code, f"no space left on device for checkpoint {checkpoint}: {detail}")


def _encode_state(state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as JSON values, and the tensors they refer to by key."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def pairs(mapping: dict, where: str) -> list[list[Any]]:
        return [
            [encode(key, f"{where} key {key!r}"), encode(value, f"{where}[{key!r}]")]
            for key, value in mapping.items()
        ]

    def encode(value: Any, where: str) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if kind is list:
            return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if kind is tuple:
            return {"__tuple__": [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if kind is dict:
            if all(type(key) is str for key in value) and not (
                len(value) == 1 and next(iter(value)) in _TAGS
            ):
                return {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}
            return {"__dict__": pairs(value, where)}
        if kind is OrderedDict:
            payload = {"items": pairs(value, where)}
            if hasattr(value, "_metadata"):
                payload["metadata"] = encode(value._metadata, f"{where}._metadata")
            return {"__odict__": payload}
        if kind is torch.Tensor:
            tensor = value.detach().cpu().contiguous()
            # safetensors refuses tensors that share memory (views, tied weights).
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            key = str(len(tensors))
            tensors[key] = tensor
            return {"__tensor__": key}
        if kind is np.ndarray or isinstance(value, np.generic):
            array = np.asarray(value)
            # A dtype its str does not describe (objects, fields) would not come back.
            if array.dtype.hasobject or np.dtype(array.dtype.str) != array.dtype:
                raise TypeError(f"{where}: NumPy dtype {array.dtype} cannot go in a checkpoint")
            tag = "__ndarray__" if kind is np.ndarray else "__npscalar__"
            data = base64.b64encode(array.tobytes()).decode("ascii")
            return {tag: {"dtype": array.dtype.str, "shape": list(array.shape), "data": data}}
        raise TypeError(f"{where}: a {kind.__qualname__} cannot go in a checkpoint")

    return encode(state, "state"), tensors


def _write_trainer_state(folder: Path, document: Any, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, folder / TRAINER_TENSORS)
    text = json.dumps({"version": _STATE_VERSION, "state": document}, allow_nan=False)
    (folder / TRAINER_STATE).write_text(text + "\n")


def _decode_state(
    document: Any, tensors: dict[str, torch.Tensor], json_path: Path, tensors_path: Path
) -> dict[str, Any]:
    used: set[str] = set()

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1 or next(iter(value)) not in _TAGS:
            return {key: decode(item) for key, item in value.items()}
        ((tag, payload),) = value.items()
        if tag == "__tuple__":
            return tuple(decode(item) for item in payload)
        if tag == "__dict__":
            return {decode(key): decode(item) for key, item in payload}
        if tag == "__odict__":
            result = OrderedDict((decode(key), decode(item)) for key, item in payload["items"])
            if "metadata" in payload:
                result._metadata = decode(payload["metadata"])
            return result
        if tag == "__float__":
            return float(payload)
        if tag == "__tensor__":
            used.add(payload)
            return tensors[payload]
        data = base64.b64decode(payload["data"], validate=True)
        array = np.frombuffer(data, dtype=np.dtype(payload["dtype"])).reshape(payload["shape"])
        return array.copy() if tag == "__ndarray__" else array[()]

    try:
        state = decode(document)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{json_path} is corrupt: {error!r}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_path} is corrupt: its state is not a dict")
    if used != tensors.keys():
        raise CheckpointError(
            f"{json_path} and {tensors_path} do not match: they come from different saves"
        )
    return state
