"""Encoding throughput of our BiEncoder against sentence-transformers on the same texts.

    python bench/encode.py --docs 512 --batch-size 64 --out bench/results/encode_cpu.md

Both encoders load the packaged all-MiniLM-L6-v2 and embed the same SciFact documents
(title + text, max 256 tokens) with the same batch size; runs alternate so that machine
load hits both alike. Prints docs/s, the ratio to sentence-transformers measured in the
same run, and the largest embedding difference between the two.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import SCIFACT_DIR, load_beir
from model import BiEncoder, packaged_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=512, help="SciFact documents to embed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per encoder")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    texts = [d.full_text for d in list(load_beir(SCIFACT_DIR, "test").corpus.values())]
    texts = texts[: args.docs]
    ours = BiEncoder.from_pretrained(packaged_model_path())
    theirs = SentenceTransformer(packaged_model_path(), device="cpu")

    def run_ours() -> torch.Tensor:
        return ours.encode(texts, kind="doc", batch_size=args.batch_size, show_progress=False)

    def run_theirs() -> torch.Tensor:
        return torch.as_tensor(theirs.encode(texts, batch_size=args.batch_size))

    encoders = {"sentence-transformers": run_theirs, "ours (BiEncoder.encode)": run_ours}
    outputs = {name: fn() for name, fn in encoders.items()}  # warm-up, and the parity check
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.repeats):
        for name, fn in encoders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)

    baseline = statistics.median(seconds["sentence-transformers"])
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append(
            f"| {name} | {len(texts) / median:.2f} | {median:.1f} | {baseline / median:.2f}× |"
        )
    max_diff = (
        (outputs["ours (BiEncoder.encode)"] - outputs["sentence-transformers"]).abs().max().item()
    )
    report = "\n".join(
        [
            "# Encoding throughput: BiEncoder vs sentence-transformers",
            "",
            f"- device: CPU {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            f"- date: {datetime.date.today().isoformat()}",
            f"- load average at start: {os.getloadavg()[0]:.1f}",
            f"- command: `python bench/encode.py {' '.join(sys.argv[1:])}`",
            f"- {len(texts)} SciFact docs, max 256 tokens, batch {args.batch_size}, "
            f"median of {args.repeats} runs after a warm-up",
            f"- max |ours − sentence-transformers| over all embeddings: {max_diff:.2e}",
            "",
            "| encoder | docs/s | seconds | speed vs sentence-transformers |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
