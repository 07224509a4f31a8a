"""Compare the runs of a sweep: group them by the keys that were swept, aggregate seeds.

A run folder is what ``train.py`` leaves behind: ``.hydra/overrides.yaml`` (the overrides
that made it, e.g. ``pooling=cls``), ``metrics.jsonl`` (a line per step and per dev
evaluation), ``checkpoints/last`` and, once it finished, ``metrics.json`` (the final
evaluation) and ``metrics.summary.json`` (the final test and best dev values; all a run
without a test evaluation writes at its end). Everything is read from disk: no network,
no W&B.

A run is unfinished when it has neither end file, or when metrics.jsonl logs steps past
``checkpoints/last`` (a run resumed after it finished and stopped again: its end files are
the stale ones of the shorter run). Unfinished runs are listed apart, never ranked: a run
killed early is not comparable with finished ones, whatever its numbers.

The swept keys are the override keys whose values differ between runs. The seed key is the
replicate axis: runs that differ only in it form one group, whose metrics are summarised
as mean, sample standard deviation and a 95% Student-t interval of the mean.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import stats as scipy_stats

from biencoder.data.errors import DataError
from biencoder.data.fields import describe
from biencoder.data.io import iter_jsonl

log = logging.getLogger(__name__)

# Metrics where lower is better, and descriptive ones with no better direction; every
# other metric is bolded at its maximum.
LOWER_IS_BETTER = {"train/loss", "alignment", "uniformity"}
DESCRIPTIVE = {"norm_mean", "norm_std", "norm_min", "norm_max", "train/false_negative_fraction"}
# Shown in the Markdown table when present, in this order; Matryoshka dims follow the
# full-dimension metric they truncate. The CSV holds every metric.
PREFERRED_METRICS = (
    "ndcg@10",
    "spearman",
    "recall@100",
    "mrr@10",
    "dev/ndcg@10",
    "dev/spearman",
    "alignment",
    "uniformity",
    "norm_mean",
    "train/accuracy",
    "train/false_negative_fraction",
    "train/loss",
)
DEV_SELECTION = ("dev/ndcg@10", "dev/spearman")
# Timings describe the machine, not the model: CSV only.
_TIMING = re.compile(r"_s$")
_DIM_METRIC = re.compile(r"^dim(\d+)/(.+)$")
# Training statistics are averaged over the last tenth of logged steps: one step is noisy.
_TRAIN_TAIL = 0.1
# What train.py writes only once training has ended, and its final checkpoint.
END_FILES = ("metrics.json", "metrics.summary.json")
LAST_CHECKPOINT_META = Path("checkpoints", "last", "checkpoint.json")


@dataclass
class RunRecord:
    """One run folder: its overrides, its metrics and its training-loss curve.

    ``metrics`` holds the final evaluation (``metrics.json``), the dev metrics at the best
    dev evaluation (``dev/...``) and the mean of each training statistic over the last
    tenth of logged steps (``train/...``). ``stopped`` says why the run counts as
    unfinished; None when it finished.
    """

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    stopped: str | None = None

    @property
    def finished(self) -> bool:
        return self.stopped is None


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and 95% t-interval of one metric over a group's seeds."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


SUMMARY_FIELDS = ("n", "mean", "std", "ci_low", "ci_high")


@dataclass
class Group:
    """Runs that share every swept value except the seed."""

    values: dict[str, str]
    runs: list[RunRecord]
    stats: dict[str, Summary]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"


@dataclass
class Comparison:
    axes: list[str]
    groups: list[Group]
    metrics: list[str]
    seed_key: str
    # Run folder -> why it is unfinished; these runs are in no group.
    unfinished: dict[Path, str]
    # Each axis's values in sweep order (numeric order for numbers), for plots.
    axis_values: dict[str, list[str]] = field(default_factory=dict)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders at or below ``paths``: every folder holding ``.hydra/overrides.yaml``."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"no such folder: {path}")
        if (path / ".hydra" / "overrides.yaml").is_file():
            found.append(path)
            continue
        nested = sorted(p.parent.parent for p in path.rglob(".hydra/overrides.yaml"))
        if not nested:
            raise FileNotFoundError(
                f"{path} holds no run folder (a folder with .hydra/overrides.yaml, "
                "as train.py writes)"
            )
        found.extend(nested)
    return sorted(set(found), key=_natural_key)


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """``["pooling=cls", "+x=1", "~y"]`` -> ``{"pooling": "cls", "x": "1", "y": "~"}``."""
    overrides = {}
    for line in lines:
        if line.startswith("~"):
            overrides[line.lstrip("~").split("=", 1)[0]] = "~"
            continue
        key, _, value = line.lstrip("+").partition("=")
        overrides[key] = value
    return overrides


def read_run(path: Path) -> RunRecord:
    """A run folder's overrides and metrics, and whether it finished (see the module doc).

    Raises DataError naming the file when metrics.json, metrics.jsonl or the last
    checkpoint's checkpoint.json is corrupt.
    """
    path = Path(path)
    overrides = parse_overrides(yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()))
    metrics: dict[str, float] = {}
    final = path / "metrics.json"
    if final.is_file():
        metrics.update(_numbers(_read_json_object(final)))
    lines = _read_jsonl(path / "metrics.jsonl")
    train_lines = [line for line in lines if "train/loss" in line]
    if train_lines:
        tail = train_lines[-max(1, math.ceil(len(train_lines) * _TRAIN_TAIL)) :]
        keys = {k for line in tail for k in line if k.startswith("train/")}
        for key in sorted(k for k in keys if not _TIMING.search(k)):
            values = [line[key] for line in tail if isinstance(line.get(key), (int, float))]
            if values:
                metrics[key] = float(np.mean(values))
    dev_lines = [line for line in lines if any(k.startswith("dev/") for k in line)]
    if dev_lines:
        # The dev evaluation train.py selected: the first maximum of its selection metric.
        selection = next((k for k in DEV_SELECTION if k in dev_lines[-1]), None)
        best = dev_lines[-1]
        if selection:
            best = max(dev_lines, key=lambda line: line.get(selection, -math.inf))
        metrics.update({k: v for k, v in _numbers(best).items() if k.startswith("dev/")})
    curve = [(int(line["step"]), float(line["train/loss"])) for line in train_lines]
    return RunRecord(path, overrides, metrics, curve, _stopped(path, lines))


def _stopped(path: Path, lines: list[dict]) -> str | None:
    if not any((path / name).is_file() for name in END_FILES):
        return f"no {' or '.join(END_FILES)}"
    meta = path / LAST_CHECKPOINT_META
    if not meta.is_file():
        # Checkpoints deleted to save space, say: nothing contradicts the end files.
        return None
    last = _read_json_object(meta).get("step")
    if not isinstance(last, int) or isinstance(last, bool):
        raise DataError(f"expected an int, got {last!r}", meta, field="step")
    logged = max((line["step"] for line in lines if isinstance(line.get("step"), int)), default=0)
    if logged > last:
        return (
            f"metrics.jsonl logs step {logged}, past checkpoints/last (step {last}): "
            "it stopped before the end"
        )
    return None


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std (ddof 1) and the 95% Student-t interval of the mean; with one value
    the std is 0 and the interval is that value (there is no spread to estimate)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("summarize needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, 0.0, mean, mean)
    std = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half)


def compare_runs(
    runs: Sequence[RunRecord], seed_key: str = "seed", metrics: Sequence[str] | None = None
) -> Comparison:
    """Group the finished ``runs`` by their swept keys (seed aside) and summarise every
    metric; the unfinished ones go to ``Comparison.unfinished``. Raises ValueError when no
    run finished."""
    if not runs:
        raise ValueError("no runs to compare")
    unfinished = {run.path: run.stopped for run in runs if run.stopped is not None}
    if len(unfinished) == len(runs):
        listed = ", ".join(f"{path} ({why})" for path, why in unfinished.items())
        raise ValueError(
            f"none of the {len(runs)} runs finished, so there is nothing to compare: {listed}"
        )
    runs = [run for run in runs if run.finished]
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    swept = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    axes = [k for k in swept if k != seed_key]
    grouped: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault(tuple(run.overrides.get(k, "") for k in axes), []).append(run)
    all_metrics = sorted({m for run in runs for m in run.metrics})
    groups = []
    for values, members in grouped.items():
        stats = {}
        for metric in all_metrics:
            found = [run.metrics[metric] for run in members if metric in run.metrics]
            if found:
                stats[metric] = summarize(found)
        groups.append(Group(dict(zip(axes, values, strict=True)), members, stats))
    shown = list(metrics) if metrics else default_metrics(all_metrics)
    missing = [m for m in shown if m not in all_metrics]
    if missing:
        raise KeyError(
            f"metric(s) {', '.join(missing)} not in any run; available: {', '.join(all_metrics)}"
        )
    primary = shown[0] if shown else None
    if primary:
        sign = 1 if primary in LOWER_IS_BETTER else -1
        groups.sort(key=lambda g: sign * g.stats[primary].mean if primary in g.stats else math.inf)
    axis_values = {a: _in_order(run.overrides.get(a, "") for run in runs) for a in axes}
    return Comparison(axes, groups, shown, seed_key, unfinished, axis_values)


def default_metrics(available: Sequence[str]) -> list[str]:
    """The preferred metrics that some run has, each followed by its Matryoshka truncations
    (largest dim first)."""
    truncations = sorted(
        ((int(m[1]), m[2], name) for name in available if (m := _DIM_METRIC.match(name))),
        reverse=True,
    )
    shown = []
    for metric in PREFERRED_METRICS:
        if metric in available:
            shown.append(metric)
            shown += [name for _, base, name in truncations if base == metric]
    return shown


def markdown_table(comparison: Comparison) -> str:
    """Rows of groups, a ``mean ± std`` column per shown metric (the best group's in bold;
    ``(n=k)`` when only k of the group's runs report it) and the primary metric's 95%
    interval."""
    axes, metrics, groups = comparison.axes, comparison.metrics, comparison.groups
    primary = metrics[0] if metrics else None
    header = [*(axes or ["runs"]), "n", *metrics]
    if primary:
        header.append(f"{primary} 95% CI")
    best = {m: _best_mean(groups, m) for m in metrics}
    rows = []
    for group in groups:
        cells = [*(group.values.values() if axes else ["all"]), str(len(group.runs))]
        for metric in metrics:
            summary = group.stats.get(metric)
            cell = "—" if summary is None else f"{summary.mean:.4f} ± {summary.std:.4f}"
            if summary is not None and len(groups) > 1 and summary.mean == best[metric]:
                cell = f"**{cell}**"
            if summary is not None and summary.n < len(group.runs):
                cell += f" (n={summary.n})"
            cells.append(cell)
        if primary:
            summary = group.stats.get(primary)
            cells.append(
                "—" if summary is None else f"[{summary.ci_low:.4f}, {summary.ci_high:.4f}]"
            )
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per group: swept values, run count, and n/mean/std/CI of every metric."""
    metrics = sorted({m for g in comparison.groups for m in g.stats})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                *comparison.axes,
                "runs",
                *(f"{m}:{part}" for m in metrics for part in SUMMARY_FIELDS),
            ]
        )
        for group in comparison.groups:
            row: list = [*group.values.values(), len(group.runs)]
            for metric in metrics:
                s = group.stats.get(metric)
                row += (
                    [""] * len(SUMMARY_FIELDS)
                    if s is None
                    else [getattr(s, f) for f in SUMMARY_FIELDS]
                )
            writer.writerow(row)


def plot_metric(comparison: Comparison, metric: str, path: Path) -> None:
    """One panel per swept axis: the metric's mean at each value of the axis, a series per
    combination of the other axes, error bars the 95% interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = comparison.axes or ["runs"]
    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    for panel, axis in zip(panels[0], axes, strict=True):
        positions = comparison.axis_values.get(axis, ["all"])
        others = [a for a in comparison.axes if a != axis]
        series: dict[str, list[Group]] = {}
        for group in comparison.groups:
            label = ", ".join(f"{a}={group.values[a]}" for a in others)
            series.setdefault(label, []).append(group)
        width = 0.6 / max(1, len(series))
        for i, (label, members) in enumerate(series.items()):
            points = [
                (positions.index(g.values.get(axis, "all")), g.stats[metric])
                for g in members
                if metric in g.stats
            ]
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            x = np.array([p for p, _ in points]) + (i - (len(series) - 1) / 2) * width
            means = np.array([s.mean for _, s in points])
            low = [s.mean - s.ci_low for _, s in points]
            high = [s.ci_high - s.mean for _, s in points]
            panel.errorbar(
                x,
                means,
                yerr=[low, high],
                fmt="o-" if len(series) > 1 else "o",
                capsize=4,
                label=label or None,
            )
        panel.set_xticks(range(len(positions)), positions, rotation=20)
        panel.set_xlabel(axis)
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
        if len(series) > 1:
            panel.legend(fontsize=8)
    seeds = sorted({len(g.runs) for g in comparison.groups})
    fig.suptitle(f"{metric}: mean and 95% interval over {_seed_phrase(seeds, comparison.seed_key)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(comparison: Comparison, path: Path) -> None:
    """Training loss per step, one line per group (mean over its seeds, smoothed), with a
    band of ± one std across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for group in comparison.groups:
        curves = [dict(run.loss_curve) for run in group.runs if run.loss_curve]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        window = max(1, len(steps) // 20)
        mean = _smooth(values.mean(axis=0), window)
        (line,) = ax.plot(steps, mean, label=group.label, linewidth=1.5)
        if len(curves) > 1:
            std = _smooth(values.std(axis=0, ddof=1), window)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss (moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training loss: mean over seeds ± std")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(comparison: Comparison, out_dir: Path, command: str) -> list[Path]:
    """comparison.md, comparison.csv, a PNG of the primary metric and the loss curves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "comparison.md", out_dir / "comparison.csv"]
    write_csv(comparison, written[1])
    images = []
    if comparison.metrics:
        primary = comparison.metrics[0]
        images.append(out_dir / f"{_file_name(primary)}.png")
        plot_metric(comparison, primary, images[-1])
    if any(run.loss_curve for g in comparison.groups for run in g.runs):
        images.append(out_dir / "loss_curves.png")
        plot_loss_curves(comparison, images[-1])
    runs = sum(len(g.runs) for g in comparison.groups)
    seeds = sorted({len(g.runs) for g in comparison.groups})
    text = [
        f"# Comparison of {runs} runs",
        "",
        f"Command: `{command}`",
        "",
        f"Swept: {', '.join(comparison.axes) or 'nothing'}; "
        f"each row aggregates {_seed_phrase(seeds, comparison.seed_key)} "
        "(mean ± sample std; the interval is the 95% Student-t interval of the mean). "
        "Bold: best mean per column (none for norms and the false-negative fraction, which "
        "describe rather than score).",
        "",
        markdown_table(comparison),
    ]
    if comparison.unfinished:
        text += [
            "Unfinished runs, left out of the table and plots:",
            "",
            *(f"- `{path}`: {why}" for path, why in comparison.unfinished.items()),
            "",
        ]
    text += [f"![{p.stem}]({p.name})" for p in images]
    written[0].write_text("\n".join(text) + "\n")
    return written + images


def _best_mean(groups: Sequence[Group], metric: str) -> float | None:
    means = [g.stats[metric].mean for g in groups if metric in g.stats]
    if not means or metric in DESCRIPTIVE:
        return None
    return min(means) if metric in LOWER_IS_BETTER else max(means)


def _in_order(values: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def _seed_phrase(counts: Sequence[int], seed_key: str) -> str:
    if counts == [1]:
        return "1 run each (no seed replicates: intervals collapse to the value)"
    shown = "–".join(str(c) for c in (counts[0], counts[-1])) if len(counts) > 1 else str(counts[0])
    return f"{shown} runs differing in `{seed_key}`"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_"))


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _numbers(mapping: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in mapping.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")
    }


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both
        raise DataError(f"invalid JSON: {err}", path) from err
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {describe(value)}", path)
    return value


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    try:
        records.extend(record for _, record in iter_jsonl(path))
    except DataError as err:
        # A run killed mid-write leaves a torn last line; anything else is corruption.
        if err.line != len(path.read_text().splitlines()):
            raise
        log.warning("%s: torn last line ignored", err)
    return records
