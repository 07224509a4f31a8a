"""runtime.files: a write cut short leaves the old file; data is on disk before the rename
that publishes it, and the rename is on disk before the write returns."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from biencoder.runtime import files
from biencoder.runtime.files import (
    TMP_PREFIX,
    append_durably,
    atomic_file,
    atomic_write,
    fsync_tree,
)


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, "old\n")
    atomic_write(target, "new ünïcode\n")
    assert target.read_text(encoding="utf-8") == "new ünïcode\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write(target, "old\n")

    def no_room(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_room)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        atomic_write(target, "new\n" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_file_writes_binary_and_a_block_that_raises_leaves_the_old_file(tmp_path):
    """mine.py keeps its corpus embeddings with np.save through atomic_file."""
    target = tmp_path / "corpus.npy"
    with atomic_file(target, "wb") as file:
        np.save(file, np.arange(6, dtype=np.float32))
    with pytest.raises(RuntimeError, match="cut short"), atomic_file(target, "wb") as file:
        np.save(file, np.zeros(1000, dtype=np.float32))
        raise RuntimeError("cut short")
    np.testing.assert_array_equal(np.load(target), np.arange(6, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.npy"]


CRASHER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from biencoder.runtime import files

    def die(fd):
        # The new text is written; the process dies before it is renamed into place.
        os.kill(os.getpid(), signal.SIGKILL)

    files.os.fsync = die
    files.atomic_write(sys.argv[1], "new\\n" * 100_000)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_crash_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, "old\n")
    crashed = subprocess.run([sys.executable, "-c", CRASHER, str(target)], check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert target.read_text() == "old\n"
    # What the crash leaves is a hidden file aside, never a part of the file in its place.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{TMP_PREFIX}state.json-")


def test_the_file_is_on_disk_before_the_rename_and_the_rename_before_returning(
    tmp_path, monkeypatch
):
    target = tmp_path / "state.json"
    text = "x" * 5000 + "\n"
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(info.st_mode) else f"file of {info.st_size} bytes"
        calls.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write(target, text)
    expected = [f"fsync file of {len(text)} bytes", "rename"]
    if os.name != "nt":
        expected.append("fsync folder")
    assert calls == expected


def test_append_durably_flushes_before_the_fsync(tmp_path, monkeypatch):
    sizes = []
    real_fsync = os.fsync

    def fsync(fd):
        sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with open(tmp_path / "log.jsonl", "a", encoding="utf-8") as text_file:
        append_durably(text_file, "line 1\n")
        append_durably(text_file, "line 2\n")
    with open(tmp_path / "out.bin", "ab") as binary_file:
        append_durably(binary_file, b"12345")
    assert sizes == [7, 14, 5]


def test_fsync_tree_pushes_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("a", "sub/b", "sub/c"):
        (tmp_path / name).write_text(name)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    fsync_tree(tmp_path)
    folders = 2 if os.name != "nt" else 0
    assert sorted(synced) == [False] * 3 + [True] * folders
