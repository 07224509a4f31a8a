"""Files that survive a crash: appends pushed to disk, and whole-file writes that leave the
old file or the new one, never part of one. The lowest layer: every other one may import
it, it imports none of them.

    atomic_write(run_dir / "launch.json", json.dumps(launch))
    append_durably(metrics_file, line)      # the line is on disk when this returns
    fsync_tree(checkpoint_folder)           # every file and folder in it
    remove(old_checkpoint)                  # a link goes, never what it points to
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, AnyStr

# Files written aside start so; a crash can leave one behind, never in place of the file.
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """An open file whose contents replace ``path`` when the block ends, so that a crash at
    any point leaves the old file or the new one: written into a temporary file in the same
    folder, pushed to disk, renamed over ``path``, and the folder's entry pushed to disk. A
    block that raises removes the temporary file and leaves ``path`` as it was. ``mode`` is
    ``"w"`` (UTF-8 text) or ``"wb"``.

        with atomic_file(cache, "wb") as file:
            np.save(file, embeddings)
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as file:
        file.write(text)


def append_durably(file: IO[AnyStr], data: AnyStr) -> None:
    """Write ``data`` to the open ``file`` and push it to disk, so that whatever is recorded
    afterwards (a progress record, a rename) never counts on data a crash could still lose."""
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Push every file below ``folder``, and every folder's entries, to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            fd = os.open(Path(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Push ``folder``'s entries (a file created in it, or renamed into it) to disk. Skipped
    where the OS cannot open a folder to fsync it (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete ``path`` and, for a folder, everything in it; a symbolic link is removed
    itself, never what it points to (a checkpoint moved to another disk and linked back
    must survive the run's clean-up). Links inside a folder are removed the same way."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path``, or the nearest folder above it that exists: where a file or folder that is
    yet to be made would go."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists())


def check_free_space(folder: str | os.PathLike[str], need: int, key: str, what: str) -> None:
    """Raise OSError (ENOSPC) naming ``key`` and ``folder`` when the disk that ``folder``
    is (or will be) on has less than ``need`` bytes free for ``what``: at start-up, not
    when the first large write runs out."""
    folder = Path(folder)
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{key}: {folder}: {free / 2**20:.0f} MiB free on its disk, {what} takes about "
            f"{need / 2**20:.0f} MiB; free some space or write elsewhere",
        )


def check_can_create(path: str | os.PathLike[str], key: str) -> None:
    """Raise ValueError ``key: ...`` unless a file can be created at ``path``: asked of the
    nearest folder above it that exists (os.access, so nothing is written), so that a run
    fails before its expensive work rather than at its first write."""
    path = Path(path)
    folder = nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise ValueError(f"{key}: {folder} is a file, so {path} cannot be written below it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"{key}: {folder} is not writable, so {path} cannot be written; choose a {key}= "
            "in a folder you can write to"
        )
