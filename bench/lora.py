"""What LoRA (``model.lora``) costs and saves against full fine-tuning, measured in the same
run: trainable parameters, optimizer state, training throughput, peak memory and the size of
a checkpoint.

Runs ``python train.py OVERRIDES model.lora.r=0`` (full fine-tuning) and ``... model.lora.r=R``
alternately ``--rounds`` times, each in its own process under ``/usr/bin/time`` (peak RSS),
and reads the run folder: ``metrics.jsonl`` (median examples/s, the first step left out as
warm-up), ``metrics.summary.json`` (parameter counts and optimizer-state bytes, which the
trainer logs) and ``checkpoints/last`` (bytes on disk; a LoRA checkpoint holds the merged
model and its adapters).

Examples (the tables committed in bench/results/lora.md)::

    python bench/lora.py --out bench/results/lora.md                      # MiniLM
    python bench/lora.py --rounds 1 -- experiment=scifact_decoder trainer.max_steps=4 \\
        trainer.eval=false                                                # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, report_header

DEFAULT_OVERRIDES = [
    "trainer.max_steps=6",
    "trainer.max_length=128",
    "trainer.eval=false",
    "train_data.dev_queries=0",
]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(overrides: list[str], rank: int, run_dir: Path) -> dict[str, float]:
    """One training run with ``model.lora.r=rank``: its throughput, sizes and peak RSS."""
    rss = run_dir.with_suffix(".rss")
    subprocess.run(
        [
            "/usr/bin/time",
            "-f",
            "%M",
            "-o",
            str(rss),
            sys.executable,
            "train.py",
            *overrides,
            f"model.lora.r={rank}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=3600,
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [line["train/examples_per_s"] for line in lines if "train/examples_per_s" in line]
    summary = json.loads((run_dir / "metrics.summary.json").read_text())
    return {
        "examples_per_s": statistics.median(speeds[1:] or speeds),
        "parameters": summary["model/parameters"],
        "trainable": summary["model/trainable_parameters"],
        "optimizer_bytes": summary["train/optimizer_state_bytes"],
        "checkpoint_bytes": folder_bytes(run_dir / "checkpoints" / "last"),
        "peak_rss_bytes": int(rss.read_text().split()[-1]) * 1024,
    }


def table(full: dict[str, float], lora: dict[str, float], rank: int) -> list[str]:
    mib = 2**20
    rows = [
        ("trainable parameters", "trainable", lambda v: f"{v:,.0f}"),
        ("optimizer state (MiB)", "optimizer_bytes", lambda v: f"{v / mib:,.1f}"),
        ("training examples/s (median)", "examples_per_s", lambda v: f"{v:.2f}"),
        ("peak RSS (MiB)", "peak_rss_bytes", lambda v: f"{v / mib:,.0f}"),
        ("checkpoint on disk (MiB)", "checkpoint_bytes", lambda v: f"{v / mib:,.1f}"),
    ]
    lines = [
        f"| | full fine-tuning | LoRA r={rank} | LoRA / full |",
        "|---|---|---|---|",
    ]
    for label, key, show in rows:
        ratio = lora[key] / full[key]
        lines.append(f"| {label} | {show(full[key])} | {show(lora[key])} | {ratio:.3f} |")
    lines.append(f"| parameters in all | {full['parameters']:,.0f} | {lora['parameters']:,.0f} | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--rank", type=int, default=16, help="model.lora.r of the LoRA runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("overrides", nargs="*", default=DEFAULT_OVERRIDES)
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    results: dict[int, list[dict[str, float]]] = {0: [], args.rank: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for rank in results:
                run_dir = Path(tmp) / f"r{rank}-{round_}"
                results[rank].append(measure(args.overrides, rank, run_dir))
                print(f"round {round_ + 1}, r={rank}: {results[rank][-1]}", flush=True)
    # Medians over rounds; sizes and counts are the same in every round.
    full, lora = (
        {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for runs in results.values()
    )
    lines = report_header(
        "LoRA against full fine-tuning",
        "cpu",
        load_at_start,
        [f"train.py overrides: `{' '.join(args.overrides)}`", f"rounds: {args.rounds}"],
    )
    report = "\n".join([*lines, *table(full, lora, args.rank), ""])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
