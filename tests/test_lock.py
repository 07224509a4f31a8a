"""runtime.lock: one writer per output, a live holder named, a dead one's lock taken over."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace

import pytest

from biencoder.runtime import lock
from biencoder.runtime.lock import Holder, Lock, LockedError


def write_record(path, holder: Holder, age_s: float = 0.0) -> None:
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age_s
    os.utime(path, (then, then))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_is_refused_naming_the_holder_and_the_key(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    first = Lock(path, "out")
    first.acquire()
    with pytest.raises(LockedError) as err:
        Lock(path, "out").acquire()
    message = str(err.value)
    assert message.startswith(f"out: {tmp_path} is being written by another process")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    first.release()
    assert not path.exists()
    second = Lock(path, "out")
    second.acquire()  # free again once released
    second.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no record files left behind


def test_acquire_is_reentrant_within_a_process_and_hold_releases_only_its_own(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    with lock.hold(path, "k"):
        with lock.hold(path, "k"):
            pass
        assert path.exists()  # the inner hold did not take it, so it did not release it
    assert not path.exists()


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(lambda h: replace(h, pid=dead_pid()), id="dead pid"),
        # The pid runs, but another program: its start time differs (pids are reused).
        pytest.param(lambda h: replace(h, started=h.started + 1), id="reused pid"),
    ],
)
def test_a_lock_whose_holder_is_gone_is_taken_over(stale, tmp_path, caplog):
    path = tmp_path / lock.LOCK_NAME
    gone = stale(Holder.me())
    write_record(path, gone)
    with lock.hold(path, "k") as held:
        assert json.loads(path.read_text())["token"] == held.holder.token
    assert "took over the lock of a process that is gone" in caplog.text
    assert f"pid {gone.pid}" in caplog.text


def test_a_live_holder_on_another_host_keeps_its_lock_until_its_heartbeat_stops(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    elsewhere = replace(Holder.me(), host="node-17", pid=1)
    write_record(path, elsewhere, age_s=lock.STALE_AFTER_S / 2)
    with pytest.raises(LockedError, match="pid 1 on host node-17"):
        Lock(path, "k").acquire()
    write_record(path, elsewhere, age_s=lock.STALE_AFTER_S * 2)
    taken = Lock(path, "k")
    taken.acquire()
    taken.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    path = tmp_path / lock.LOCK_NAME
    held = Lock(path, "k")
    held.acquire()
    past = time.time() - 1000
    os.utime(path, (past, past))
    time.sleep(0.5)
    assert path.stat().st_mtime > past + 900
    held.release()


def test_a_sigkilled_holder_does_not_block_the_next_writer(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    code = textwrap.dedent(
        f"""
        import sys, time
        from biencoder.runtime.lock import Lock
        Lock(__import__("pathlib").Path({str(path)!r}), "k").acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {proc.pid}"):
        Lock(path, "k").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.exists()  # a SIGKILL leaves the lock behind...
    taken = Lock(path, "k")
    taken.acquire()  # ...and the next writer takes it over
    taken.release()


def _contend(path: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        Lock(__import__("pathlib").Path(path), "k").acquire()
    except LockedError:
        results.put("refused")
        return
    results.put("won")
    time.sleep(3)  # hold it until every contender has tried


def test_contenders_for_a_stale_lock_leave_exactly_one_holder(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    write_record(path, replace(Holder.me(), pid=dead_pid()))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start = time.time() + 0.5
    procs = [context.Process(target=_contend, args=(str(path), start, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_folder_that_cannot_be_written_names_the_key(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "write_text", refuse)
    with pytest.raises(PermissionError, match=f"hydra.run.dir: {tmp_path} is not writable"):
        Lock(tmp_path / lock.LOCK_NAME, "hydra.run.dir").acquire()
