"""What the benchmarks share: peak-memory probes, one configuration per subprocess, and the
header that every results file starts with (device, date, versions, load, command)."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water RSS mark (writing 5 to clear_refs, Linux >= 4.0), so a
    peak is measured from here and not from import time; False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KIB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_rss(work: Callable[[], object]) -> tuple[object, int]:
    """Run ``work`` and return (its result, the peak resident memory it added, in bytes)."""
    baseline = rss_bytes("VmRSS")
    if reset_peak_rss():
        result = work()
        return result, rss_bytes("VmHWM") - baseline
    result = work()
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB - baseline


def is_oom(error: BaseException) -> bool:
    import torch

    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("out of memory" in message or "can't allocate memory" in message)
    )


def measure_in_subprocess(script: Path, config: dict, timeout: float) -> dict:
    """Run ``script --worker CONFIG`` in a fresh process, so that its peak memory is its own,
    and return the JSON dict it prints last (or a status: timeout, OOM, error)."""
    command = [sys.executable, str(script), "--worker", json.dumps(config)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if completed.returncode == -9:
        # SIGKILL during a big allocation is the Linux OOM killer.
        return {"status": "OOM"}
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"error: {last_line[:80]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def commit() -> str:
    """The checked-out commit, marked when the tree differs from it: a record names the
    code it measured."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head or 'unknown'}{' with uncommitted changes' if dirty else ''}"


def report_header(title: str, device: str, load_at_start: float, notes: list[str]) -> list[str]:
    """The lines a results file starts with: what ran where, when, and how busy it was."""
    import torch

    command = " ".join(shlex.quote(part) for part in ["python", *sys.argv])
    return [
        f"# {title}",
        "",
        f"- device: {device_name(device)}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {commit()}",
        f"- torch {torch.__version__}, triton {package_version('triton')}",
        f"- 1-minute load average at start: {load_at_start:.1f}",
        f"- command: `{command}`",
        *(f"- {note}" for note in notes),
        "",
    ]


def main(
    args: argparse.Namespace,
    worker: Callable[[dict], dict],
    driver: Callable[[argparse.Namespace], str],
) -> None:
    """A benchmark's entry point: with ``--worker CONFIG`` measure that one configuration
    (in the process :func:`measure_in_subprocess` started) and print it as JSON; otherwise
    build the report, which the driver prints as it goes, and write it to ``--out``."""
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    report = driver(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
