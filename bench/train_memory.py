"""Peak memory of training at large batch sizes: does anything in a step grow as B×N?

Two tables, each configuration in a fresh process:

* ``step``: one full InfoNCE training step (tokenise, embed, loss, statistics, backward) of
  a tiny random 2-layer BERT on B short text pairs (N = B documents), with the ranking
  statistics taken from the loss (now) and, as the baseline measured in the same run, with
  the B×N statistics training computed before (``legacy``: the removed
  ``training/tasks.py::_ranking_stats``, reproduced below). Peak extra memory is the growth
  of the resident set over the step.
* ``cli``: the command line ``python train.py model.path=M train_data=jsonl ...
  trainer.batch_size=B trainer.max_steps=2 trainer.eval=false`` on B pairs, its peak
  resident memory as a whole process (``getrusage`` of the child).

Example (the table committed in bench/results/train_memory.md)::

    python bench/train_memory.py --step-sizes 8192 32768 --cli-sizes 1024 8192 \\
        --out bench/results/train_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import torch
from common import MIB, REPO_ROOT, measure_in_subprocess, peak_extra_rss, report_header

MODES = ("legacy", "loss")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--step-sizes", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--cli-sizes", type=int, nargs="*", default=[1024, 8192])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _texts(count: int, kind: str) -> list[str]:
    # Short, distinct texts: the encoder's activations stay small next to any B×N matrix.
    return [f"{kind} {i} about topic {i % 97} and item {i % 13}" for i in range(count)]


def _pairs(count: int):
    from biencoder.data.training import Pair

    return [Pair(q, p) for q, p in zip(_texts(count, "query"), _texts(count, "doc"), strict=True)]


def _tiny_model_folder(root: Path) -> Path:
    from biencoder.model.config import EncoderConfig
    from biencoder.model.weights import packaged_model_path, save_random_bert

    torch.manual_seed(0)
    return save_random_bert(root / "tiny-bert", Path(packaged_model_path()), EncoderConfig.tiny())


@torch.no_grad()
def _legacy_ranking_stats(q, d, doc_ids) -> dict[str, float]:
    """The statistics training/tasks.py computed until this benchmark was written: a B×N
    score matrix, a B×N mask, a masked copy and a clone, every step."""
    batch, num_docs = q.shape[0], d.shape[0]
    scores = q.float() @ d.float().T
    rows = torch.arange(batch, device=q.device)
    masked = doc_ids[:batch, None] == doc_ids[None, :]
    masked[rows, rows] = False
    scores = scores.masked_fill(masked, float("-inf"))
    positives = scores[rows, rows]
    stats = {
        "accuracy": (scores.argmax(dim=1) == rows).float().mean().item(),
        "false_negative_fraction": masked.sum().item() / (batch * (num_docs - 1)),
    }
    others = scores.clone()
    others[rows, rows] = float("-inf")
    best_other = others.amax(dim=1)
    stats["margin"] = (positives - best_other).mean().item()
    return stats


def _run_step_worker(config: dict) -> dict:
    from biencoder.model.biencoder import BiEncoder
    from biencoder.training.infonce_task import InfoNCETask
    from biencoder.training.step import train_step

    torch.set_num_threads(os.cpu_count() or 1)
    size = config["size"]
    with tempfile.TemporaryDirectory() as tmp:
        model = BiEncoder.from_pretrained(_tiny_model_folder(Path(tmp))).train()
    task = InfoNCETask()
    if config["mode"] == "legacy":
        plain_forward = task.forward

        def forward(embeddings, batch):
            loss, stats = plain_forward(embeddings, batch)
            q, d = embeddings[0], torch.cat(embeddings[1:])
            return loss, {**stats, **_legacy_ranking_stats(q, d, batch.doc_ids)}

        task.forward = forward
    batch = task.make_batch(_pairs(size))
    # A small step first, so that thread pools and allocator arenas exist before the baseline.
    train_step(model, task, task.make_batch(_pairs(64)))
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    result, peak = peak_extra_rss(lambda: train_step(model, task, batch))
    return {
        "status": "ok",
        "peak_extra_bytes": peak,
        "seconds": time.perf_counter() - start,
        "loss": result.loss.item(),
    }


def _run_cli(size: int, root: Path, timeout: float) -> dict:
    """Peak RSS of ``python train.py ...`` on ``size`` pairs, as the issue's contract runs it."""
    pairs = root / f"pairs-{size}.jsonl"
    with open(pairs, "w") as f:
        for pair in _pairs(2 * size):
            f.write(json.dumps({"query": pair.query, "positive": pair.positive}) + "\n")
    command = [
        sys.executable,
        "train.py",
        f"model.path={root / 'tiny-bert'}",
        "train_data=jsonl",
        f"train_data.path={pairs}",
        "train_data.format=pairs",
        f"trainer.batch_size={size}",
        "trainer.max_steps=2",
        "trainer.eval=false",
        f"hydra.run.dir={root / f'run-{size}'}",
    ]
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the maximum over
        # every child so far, the step workers included).
        _, status, usage = os.wait4(process.pid, 0)
        killer.cancel()
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            last = (stderr.read().strip().splitlines() or ["?"])[-1]
            return {"status": "timeout" if seconds >= timeout else f"error: {last[:80]}"}
    return {"status": "ok", "seconds": seconds, "peak_bytes": usage.ru_maxrss * 1024}


def _run_driver(args: argparse.Namespace) -> str:
    load_at_start = os.getloadavg()[0]
    rows = [
        "## One training step (tiny BERT, B pairs, N = B)",
        "",
        "| B | statistics | peak extra MiB | step s | legacy mem / mem |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    script = Path(__file__).resolve()
    for size in args.step_sizes:
        results = {}
        for mode in MODES:
            results[mode] = measure_in_subprocess(
                script, {"size": size, "mode": mode}, args.timeout
            )
        for mode, result in results.items():
            legacy = results["legacy"]
            if result["status"] != "ok":
                rows.append(f"| {size} | {mode} | {result['status']} | – | – |")
            else:
                ratio = (
                    f"{legacy['peak_extra_bytes'] / max(result['peak_extra_bytes'], 1):.1f}×"
                    if legacy["status"] == "ok"
                    else "–"
                )
                rows.append(
                    f"| {size} | {mode} | {result['peak_extra_bytes'] / MIB:.0f} "
                    f"| {result['seconds']:.1f} | {ratio} |"
                )
            print(rows[-1], flush=True)

    if args.cli_sizes:
        rows += [
            "",
            "## train.py on B pairs (whole process, 2 steps)",
            "",
            "| B | peak RSS MiB | wall s | peak / peak at smallest B | B / smallest B |",
            "|---|---|---|---|---|",
        ]
        print("\n".join(rows[-5:]), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _tiny_model_folder(root)
            first = None
            for size in sorted(args.cli_sizes):
                result = _run_cli(size, root, args.timeout)
                if result["status"] != "ok":
                    rows.append(f"| {size} | {result['status']} | – | – | – |")
                else:
                    peak = result["peak_bytes"]
                    first = first or (size, peak)
                    rows.append(
                        f"| {size} | {peak / MIB:.0f} | {result['seconds']:.1f} "
                        f"| {peak / first[1]:.2f}× | {size / first[0]:.0f}× |"
                    )
                print(rows[-1], flush=True)

    header = report_header(
        "Training memory at large batch sizes",
        "cpu",
        load_at_start,
        [
            "model: random BERT, 2 layers, hidden 32 (all-MiniLM-L6-v2's tokenizer); "
            "texts of ~12 tokens",
            "legacy = the same step plus the B×N statistics training/tasks.py computed "
            "before they came out of the loss",
        ],
    )
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    common.main(_parse_args(argv), _run_step_worker, _run_driver)


if __name__ == "__main__":
    main()
