"""One writer per output: an exclusive lock file beside what a command writes, taken before
its first byte and released when it ends.

    with hold(run_dir / LOCK_NAME, "hydra.run.dir"):
        ...                                   # the only process writing run_dir

What it relies on, so that it also holds on a shared (NFS, Lustre) filesystem where
``flock`` may be a no-op: creating a hard link is atomic and fails when the name exists.
The lock's record (pid, host, start time, a random token) is written to a file of its own
first and then linked in, so a reader never sees a half-written lock.

A lock whose holder is gone is broken and taken over, so a crashed (even SIGKILLed) run
does not block the next one:

- on the same host, the holder is gone when its pid is not running, or runs another
  program than the one that took the lock (its start time differs: pids are reused);
- on another host (a shared filesystem), the holder is gone when it has not refreshed the
  lock's modification time for :data:`STALE_AFTER_S`; a holder refreshes it every
  :data:`HEARTBEAT_S` from a background thread. This assumes the hosts' clocks agree to
  within minutes.

Breaking is itself race-free: a breaker first links the stale lock to a name made of its
token (which fails if another breaker got there first), checks that the linked file still
holds the stale token, and only then removes the lock.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from biencoder.runtime.files import TMP_PREFIX

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0

# Locks this process holds, by resolved path: taking one again is a no-op (an entry point
# locks before Hydra writes, the training function again for callers that skip it).
_held: dict[Path, Lock] = {}
_held_guard = threading.Lock()


class LockedError(RuntimeError):
    """The output is being written by another live process."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: float  # the process's start time as the OS reports it (0 when unknown)
    since: float  # when the lock was taken (seconds since the epoch)
    token: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(
            pid=pid,
            host=socket.gethostname(),
            started=_process_start(pid),
            since=time.time(),
            token=uuid.uuid4().hex,
            command=" ".join(sys.argv)[:500],
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} since {when} ({self.command})"


def _process_start(pid: int) -> float:
    """The start time of ``pid`` in clock ticks since boot (/proc), 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rsplit(")", 1)[1].split()
    return float(fields[19])


def _alive(holder: Holder, mtime: float) -> bool:
    if holder.host != socket.gethostname():
        return time.time() - mtime < STALE_AFTER_S
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = _process_start(holder.pid)
    return not (holder.started and started and started != holder.started)


def _read(path: Path) -> tuple[Holder, float] | None:
    """The lock's holder and its modification time; None when there is no lock."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text)), mtime
    except (ValueError, TypeError) as err:
        raise LockedError(
            f"{path}: not a lock record ({err}); if no process is writing there, delete it"
        ) from err


class Lock:
    """An exclusive lock on whatever ``path`` guards; see the module docstring."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        # A run folder's lock guards its folder, a lock from beside() the file it names.
        name = self.path.name
        guarded = self.path.with_name(name.removesuffix(".lock"))
        self.guarded = self.path.parent if name == LOCK_NAME else guarded
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        # Named as a temporary file, so a crash before the link leaves litter known as such.
        record = self.path.with_name(f"{TMP_PREFIX}{self.path.name}-{self.holder.token}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(asdict(self.holder)))
        except OSError as err:
            # OSError() picks the subclass from the errno: EACCES gives a PermissionError.
            raise OSError(
                err.errno, f"{self.key}: {self.path.parent} is not writable: {err.strerror}"
            ) from err
        try:
            while not self._link(record):
                self._break_if_stale()
        finally:
            record.unlink(missing_ok=True)
        self._heartbeat = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _link(self, record: Path) -> bool:
        try:
            os.link(record, self.path)
        except FileExistsError:
            return False
        return True

    def _break_if_stale(self) -> None:
        found = _read(self.path)
        if found is None:
            return
        holder, mtime = found
        if holder.token == self.holder.token:
            return
        if _alive(holder, mtime):
            raise LockedError(
                f"{self.key}: {self.guarded} is being written by another process: "
                f"{holder.describe()}. Wait for it to end, or write elsewhere; if it is gone "
                f"for good (a crashed machine), delete {self.path}"
            )
        marker = self.path.with_name(f"{self.path.name}.broken-{holder.token}")
        try:
            os.link(self.path, marker)
        except (FileExistsError, FileNotFoundError):
            time.sleep(0.05)  # another process is breaking it, or just released it
            return
        try:
            if (_read(marker) or (None, 0))[0] == holder:
                self.path.unlink()
                log.warning(
                    "%s: took over the lock of a process that is gone: %s",
                    self.path,
                    holder.describe(),
                )
        finally:
            marker.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        found = None
        with contextlib.suppress(LockedError):
            found = _read(self.path)
        # Never remove a lock this process does not hold (one broken and retaken while
        # this process was suspended past STALE_AFTER_S).
        if found is not None and found[0].token == self.holder.token:
            self.path.unlink(missing_ok=True)


def beside(output: Path) -> Path:
    """The lock that guards the file ``output`` and the files written beside it (its
    progress record, caches): ``<output>.lock``."""
    output = Path(output)
    return output.with_name(f"{output.name}.lock")


def acquire(path: Path, key: str) -> Lock:
    """Take the lock at ``path`` for this process (a no-op when it already holds it), to be
    released by :func:`release` or at exit. ``key`` names the setting that chose the
    guarded output, for the message a second writer gets."""
    resolved = Path(path).resolve()
    with _held_guard:
        if resolved in _held:
            return _held[resolved]
        lock = Lock(resolved, key)
        lock.acquire()
        _held[resolved] = lock
        return lock


def release(path: Path) -> None:
    with _held_guard:
        lock = _held.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.release()


@contextlib.contextmanager
def hold(path: Path, key: str) -> Iterator[Lock]:
    """The lock at ``path`` for the block; one this process already held stays held."""
    resolved = Path(path).resolve()
    owned = resolved not in _held
    lock = acquire(resolved, key)
    try:
        yield lock
    finally:
        if owned:
            release(resolved)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release(path)
