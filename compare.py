"""Compare the runs of a sweep: a table and plots from run folders, no network needed.

    python compare.py multirun/ablation_pooling/2026-11-23_10-00-00
    python compare.py outputs/train/run_a outputs/train/run_b --out /tmp/ab
    python compare.py SWEEP --metrics ndcg@10 dim64/ndcg@10 alignment --seed-key seed

Runs are grouped by the overrides that differ between them (``pooling=cls``, ...), except
the seed, over which each group's metrics are aggregated (mean ± std, 95% interval).
Unfinished runs (killed, or still running) are listed below the table, never ranked.
Writes ``comparison.md``, ``comparison.csv``, ``<metric>.png`` (the first metric per swept
axis, with error bars) and ``loss_curves.png`` into ``--out`` (default: the folder given,
or the runs' common parent), and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from biencoder.evaluation.sweeps import (
    compare_runs,
    find_runs,
    markdown_table,
    read_run,
    write_report,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="a multirun folder, or run folders")
    parser.add_argument("--out", type=Path, help="where the table and plots go")
    parser.add_argument(
        "--metrics", nargs="+", help="columns, the first one plotted (default: the usual ones)"
    )
    parser.add_argument("--seed-key", default="seed", help="the override that replicates runs")
    args = parser.parse_args(argv)

    run_dirs = find_runs(args.paths)
    comparison = compare_runs([read_run(d) for d in run_dirs], args.seed_key, args.metrics)
    out = args.out or Path(os.path.commonpath([p.resolve() for p in map(Path, args.paths)]))
    command = shlex.join(["python", "compare.py", *(argv if argv is not None else sys.argv[1:])])
    written = write_report(comparison, out, command)
    print(markdown_table(comparison))
    if comparison.unfinished:
        print("unfinished runs, left out of the table:")
        for path, why in comparison.unfinished.items():
            print(f"  {path}: {why}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
