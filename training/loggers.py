"""Metric loggers: a JSONL file that survives crashes, W&B when asked, and a fan-out of both.

    loggers = MultiLogger([
        JsonlLogger(run_dir / "metrics.jsonl", resume_step=state["step"] if resuming else None),
        WandbLogger("biencoder", run_dir, config, run_id=state.get("wandb_run_id")),
    ])
    loggers.log({"train/loss": 0.7, "train/lr": 1e-5}, step=100)
    loggers.summary({"test/ndcg@10": 0.66})
    loggers.finish()

Every logger has ``log(metrics, step)``, ``summary(metrics)`` and ``finish()``.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from biencoder.runtime.files import append_durably, atomic_write

if TYPE_CHECKING:
    from wandb import Run

log = logging.getLogger(__name__)

STEP_KEY = "step"
_RESERVED_KEYS = (STEP_KEY, "time")
# W&B's own host before it moved behind CoreWeave's; `wandb login` keys written by older
# versions sit in .netrc under it.
_LEGACY_WANDB_HOST = "api.wandb.ai"
# run.finish() otherwise waits for the upload however slow the network is; what did not
# upload stays in the run's local .wandb file for `wandb sync`.
FINISH_TIMEOUT_S = 600.0


class Logger(Protocol):
    """What the trainer calls on every logger."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def summary(self, metrics: Mapping[str, float]) -> None: ...

    def finish(self) -> None: ...


class JsonlLogger:
    """Appends ``{"step": int, "time": unix seconds, **metrics}`` lines to ``path``.

    Each line is flushed and fsync'd before ``log`` returns, so a crash loses nothing that
    was logged. When resuming from a checkpoint taken at ``resume_step``, lines with a
    larger step (the part of the run that will be recomputed) are dropped first; a line
    cut short by a crash is always dropped. The file is then rewritten atomically.
    ``summary`` merges final metrics into ``<stem>.summary.json`` next to it.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.summary_path = self.path.with_name(f"{self.path.stem}.summary.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _truncate_jsonl(self.path, resume_step)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: log() after finish()")
        clash = sorted(set(metrics) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"metric names {clash} are reserved")
        record = {STEP_KEY: step, "time": time.time(), **_plain(metrics)}
        append_durably(self._file, json.dumps(record) + "\n")

    def summary(self, metrics: Mapping[str, float]) -> None:
        merged = {}
        if self.summary_path.exists():
            merged = json.loads(self.summary_path.read_text())
        merged |= _plain(metrics)
        atomic_write(self.summary_path, json.dumps(merged, indent=2) + "\n")

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger:
    """A Weights & Biases run whose files go under ``run_dir/wandb/``.

    ``mode=None`` picks, via ``resolve_wandb_mode``: ``WANDB_MODE`` if set, else "online"
    when an API key is configured, else "offline"; the choice and the reason are logged.
    ``run_id`` resumes that run (``resume="allow"``): store ``.run_id`` in checkpoints.
    If an online start fails (no key, no network: wandb gives up after about
    ``init_timeout`` plus its own retries), the run starts offline with the same id
    instead, to upload later with ``wandb sync``.

    Every metric is plotted against the trainer's step, logged as the ``step`` key, not
    W&B's internal ``_step``: W&B drops rows whose ``_step`` goes backwards, which is what
    a resumed run's recomputed steps would do.
    """

    def __init__(
        self,
        project: str,
        run_dir: Path,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        run_id: str | None = None,
        entity: str | None = None,
        init_timeout: float = 30.0,
    ):
        # Imported here: wandb takes about a second to import, runs without it skip that.
        import wandb

        mode, reason = resolve_wandb_mode(mode)
        log.info("W&B mode %s: %s", mode, reason)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        init_args = dict(
            project=project,
            entity=entity,
            dir=run_dir,
            config=dict(config),
            name=name,
            group=group,
            tags=tags,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=init_timeout, finish_timeout=FINISH_TIMEOUT_S),
        )
        try:
            self._run: Run | None = wandb.init(mode=mode, **init_args)
        except wandb.errors.Error as err:
            if mode != "online":
                raise
            log.warning("W&B online start failed (%s); logging offline instead", err)
            # A half-started online run keeps its id busy in wandb's service process.
            wandb.teardown()
            self._run = wandb.init(mode="offline", **init_args)
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)
        self.run_id: str = self._run.id
        self.mode: str = self._run.settings.mode

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if STEP_KEY in metrics:
            raise ValueError(f"metric name {STEP_KEY!r} is reserved")
        self._active().log({**_plain(metrics), STEP_KEY: step})

    def summary(self, metrics: Mapping[str, float]) -> None:
        self._active().summary.update(_plain(metrics))

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def _active(self) -> Run:
        if self._run is None:
            raise RuntimeError(f"W&B run {self.run_id}: used after finish()")
        return self._run


class MultiLogger:
    """Sends every call to each of ``loggers``, in order."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.summary(metrics)

    def finish(self) -> None:
        """Finishes every logger, even if one fails; then raises the first failure."""
        errors = []
        for logger in self.loggers:
            try:
                logger.finish()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


def resolve_wandb_mode(mode: str | None) -> tuple[str, str]:
    """The W&B mode to use for ``mode`` (None: decide) and why, without network access.

    An explicit mode wins, then the ``WANDB_MODE`` environment variable. Otherwise "online"
    if ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` is set, or the .netrc file
    (``$NETRC``, else ``~/.netrc``) has a key for the W&B host (``WANDB_BASE_URL``, else
    wandb's default) or for api.wandb.ai; else "offline". A key kept only in wandb's
    settings file is not seen: pass ``mode="online"`` for that.
    """
    if mode is not None:
        return mode, "asked for"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "from WANDB_MODE"
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(variable):
            return "online", f"{variable} is set"
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    for host in _wandb_hosts():
        if _netrc_has(netrc_path, host):
            return "online", f"{netrc_path} has a key for {host}"
    return "offline", "no W&B API key in the environment or .netrc"


# ------------------------------------------------------------------------------- helpers


def _wandb_hosts() -> list[str]:
    import wandb

    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    return list(dict.fromkeys([urlsplit(base_url).netloc, _LEGACY_WANDB_HOST]))


def _netrc_has(path: Path, host: str) -> bool:
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _plain(metrics: Mapping[str, float]) -> dict[str, int | float]:
    """Tensors and NumPy scalars as Python numbers; ints stay ints."""
    plain = {}
    for key, value in metrics.items():
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise TypeError(f"metric {key!r}: expected a number, got {value!r}")
        plain[key] = number
    return plain


def _truncate_jsonl(path: Path, resume_step: int | None) -> None:
    kept, dropped_later, dropped_broken = [], 0, 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                record = None
            step = record.get(STEP_KEY) if isinstance(record, dict) else None
            if not isinstance(step, int):
                dropped_broken += 1
            elif resume_step is not None and step > resume_step:
                dropped_later += 1
            else:
                kept.append(line)
    if dropped_later or dropped_broken:
        log.info(
            "%s: dropped %d lines after step %s and %d unreadable ones",
            path,
            dropped_later,
            resume_step,
            dropped_broken,
        )
        atomic_write(path, "".join(kept))
