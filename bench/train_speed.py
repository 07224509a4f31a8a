"""Training speed of this tree against another commit, measured in the same run.

Runs the same ``python train.py ...`` command in this working tree and in a checkout of
``--baseline`` (a temporary git worktree), alternating ``--rounds`` times so that a machine
slowing down weighs on both alike, and reports the median training throughput (examples/s
from ``metrics.jsonl``, the first step left out as warm-up) and their ratio.

Example (the table committed in bench/results/train_speed.md)::

    python bench/train_speed.py --baseline 5e41517 --out bench/results/train_speed.md
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
    "trainer.max_steps=8",
    "trainer.max_length=112",
    "trainer.eval=false",
    "train_data.dev_queries=0",
]


def own_code_path(tree: Path, links: Path) -> str:
    """A PYTHONPATH on which ``tree``'s train.py imports ``tree``'s code, not this tree's
    editable install: a link named ``biencoder`` to it (the import root since 6d4880c) and
    the tree itself (commits before it import their folders by their own names)."""
    link = links / "biencoder"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(tree.resolve(), target_is_directory=True)
    return os.pathsep.join([str(links), str(tree)])


def examples_per_second(tree: Path, overrides: list[str], run_dir: Path, links: Path) -> float:
    """Median training throughput of ``python train.py overrides`` run in ``tree``."""
    subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=3600,
        env={**os.environ, "PYTHONPATH": own_code_path(tree, links)},
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line["train/examples_per_s"] for line in lines if "train/examples_per_s" in line]
    return statistics.median(steps[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "overrides", nargs="*", default=DEFAULT_OVERRIDES, help="train.py overrides"
    )
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    speeds: dict[str, list[float]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        try:
            for round_ in range(args.rounds):
                for name, tree in (("baseline", worktree), ("this tree", REPO_ROOT)):
                    run_dir = Path(tmp) / f"{name.replace(' ', '_')}-{round_}"
                    links = Path(tmp) / "links" / name.replace(" ", "_")
                    speeds[name].append(examples_per_second(tree, args.overrides, run_dir, links))
                    print(f"round {round_ + 1}: {name} {speeds[name][-1]:.2f} examples/s")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO_ROOT, check=True
            )
    base = statistics.median(speeds["baseline"])
    rows = [
        "| tree | examples/s (median of rounds) | each round | speed / baseline |",
        "|---|---|---|---|",
    ]
    for name, values in speeds.items():
        median = statistics.median(values)
        shown = ", ".join(f"{v:.2f}" for v in values)
        rows.append(f"| {name} | {median:.2f} | {shown} | {median / base:.3f} |")
    header = report_header(
        "Training speed against another commit",
        "cpu",
        load_at_start,
        [
            f"baseline: {args.baseline}; this tree: "
            + subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
            + " plus uncommitted changes, if any",
            f"train.py {' '.join(args.overrides)} (the packaged MiniLM on SciFact unless the "
            "overrides say otherwise); the first step of each run left out as warm-up",
        ],
    )
    report = "\n".join(header + rows) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
