"""Encoding throughput of our BiEncoder against sentence-transformers on the same texts.

    python bench/encode.py --docs 512 --batch-size 64 --out bench/results/encode_cpu.md

Both load the packaged all-MiniLM-L6-v2 and embed the same SciFact documents (title +
text, max 256 tokens) with the same batch size. Ours runs three ways: fp32 on the padded
batch, fp32 on the packed real tokens (the default), and bf16 autocast where torch
supports it. Runs alternate so that machine load hits all alike. Prints docs/s, the ratio
to sentence-transformers measured in the same run, and each one's largest embedding
difference from sentence-transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import report_header

from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR
from biencoder.model.biencoder import BiEncoder
from biencoder.model.weights import packaged_model_path
from biencoder.runtime.device import bf16_supported


def print_profile(name: str, encode: Callable[[], object]) -> None:
    """Each op's share of the self CPU time of one ``encode()`` after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    encode()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{name}: {total / 1e6:.2f} s self CPU time")
    for event in events[:6]:
        print(f"  {event.self_cpu_time_total / total:6.1%}  {event.key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=512, help="SciFact documents to embed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per encoder")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: where fp32 time goes, ours and sentence-transformers, on one batch of "
        "the longest documents (shares of torch.profiler's self CPU time per op)",
    )
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    load_at_start = os.getloadavg()[0]
    texts = [d.full_text for d in list(load_beir(SCIFACT_DIR, "test").corpus.values())]
    texts = texts[: args.docs]
    ours = BiEncoder.from_pretrained(packaged_model_path())
    theirs = SentenceTransformer(packaged_model_path(), device="cpu")

    def run_ours(unpadded: bool, precision: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            ours.set_unpadded(unpadded)
            return ours.encode(
                texts,
                kind="doc",
                batch_size=args.batch_size,
                show_progress=False,
                precision=precision,
            )

        return run

    def run_theirs() -> torch.Tensor:
        return torch.as_tensor(theirs.encode(texts, batch_size=args.batch_size))

    if args.profile:
        longest = sorted(texts, key=len, reverse=True)[: args.batch_size]
        print(f"one batch of the {len(longest)} longest of {len(texts)} documents, fp32")
        print_profile("ours", lambda: ours.encode(longest, kind="doc", show_progress=False))
        print_profile(
            "sentence-transformers", lambda: theirs.encode(longest, batch_size=len(longest))
        )
        return

    st = "sentence-transformers"
    encoders = {
        st: run_theirs,
        "ours, fp32, padded": run_ours(unpadded=False, precision="fp32"),
        "ours, fp32, unpadded (default)": run_ours(unpadded=True, precision="fp32"),
    }
    skipped = ""
    if bf16_supported(torch.device("cpu")):
        encoders["ours, bf16 autocast, unpadded"] = run_ours(unpadded=True, precision="bf16")
    else:
        skipped = "bf16 not run: torch reports no bfloat16 support on this CPU"
    outputs = {name: fn() for name, fn in encoders.items()}  # warm-up, and the parity check
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.repeats):
        for name, fn in encoders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)

    baseline = statistics.median(seconds[st])
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        diff = (outputs[name] - outputs[st]).abs().max().item()
        rows.append(
            f"| {name} | {len(texts) / median:.2f} | {median:.1f} | {baseline / median:.2f}× "
            f"| {diff:.2e} |"
        )
    notes = [
        f"{torch.get_num_threads()} threads",
        f"{len(texts)} SciFact docs, max 256 tokens, batch {args.batch_size}, "
        f"median of {args.repeats} runs after a warm-up, encoders alternating",
        "max abs diff: the largest coordinate difference from sentence-transformers' "
        "embeddings (unit vectors), over all of them",
        *([skipped] if skipped else []),
    ]
    title = "Encoding throughput: BiEncoder vs sentence-transformers"
    report = "\n".join(
        [
            *report_header(title, "cpu", load_at_start, notes),
            "| encoder | docs/s | seconds | speed vs sentence-transformers "
            "| max abs diff vs sentence-transformers |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
