"""Per-rank cost of InfoNCE when K processes share a global batch.

Each of K ranks holds B/K queries, their positives and hard negatives; the loss gathers
every rank's documents (with gradient) and ranks its own queries against all of them
(``InfoNCETask.compute_sharded``), so a rank's logits are (B/K) x N instead of B x N. The
benchmark runs the real code path (a sharded TextBatch, the task, the gather) on random
unit embeddings and reports, per rank, the forward+backward time and the peak memory the
loss adds (resident set on CPU, allocated memory on CUDA), and their ratio to K = 1
measured in the same run. On CPU the ranks share the machine's cores, so times are those
of the ranks running side by side.

Example (the table committed in bench/results/distributed_cpu.md)::

    python bench/distributed.py --batch 4096 --dim 384 --ranks 1 2 \\
        --out bench/results/distributed_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from common import MIB, peak_extra_rss, report_header


def _worker(rank: int, world: int, config: dict, rendezvous: str, out: str) -> None:
    from biencoder.data.training import Triplet
    from biencoder.training.distributed import Distributed
    from biencoder.training.infonce_task import InfoNCETask

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(config["device"])
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    dist = Distributed(rank=rank, world_size=world, local_rank=rank, device=device)
    batch_size, dim = config["batch"], config["dim"]
    task = InfoNCETask(temperature=0.05)
    examples = [Triplet(f"q{i}", f"p{i}", (f"n{i}",)) for i in range(batch_size)]
    batch = task.make_batch(examples)
    if dist.enabled:
        batch = batch.shard_for(dist)
    generator = torch.Generator().manual_seed(rank)

    def embeddings(rows: int) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)
        return x.to(device).requires_grad_()

    def step() -> float:
        columns = [embeddings(len(column)) for column in batch.columns]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = task(columns, batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - start

    step()  # warm-up: thread pools, allocator arenas, Gloo buffers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _, peak = peak_extra_rss(step)
    seconds = statistics.median(step() for _ in range(config["repeats"]))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "peak": peak}))
    if dist.enabled:
        tdist.destroy_process_group()


def measure(world: int, config: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = f"file://{tmp}/rendezvous"
        mp.start_processes(
            _worker, args=(world, config, rendezvous, tmp), nprocs=world, start_method="spawn"
        )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--batch", type=int, default=4096, help="global batch B (queries)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    config = {"batch": args.batch, "dim": args.dim, "repeats": args.repeats, "device": args.device}
    rows = [
        "| K | rank | queries per rank | documents N | fwd+bwd s | time / K=1 | peak extra MiB "
        "| memory / K=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    baseline = None
    for world in args.ranks:
        results = measure(world, config)
        baseline = baseline or results[0]
        for rank, result in enumerate(results):
            rows.append(
                f"| {world} | {rank} | {args.batch // world} | {2 * args.batch} "
                f"| {result['seconds']:.2f} | {result['seconds'] / baseline['seconds']:.2f}x "
                f"| {result['peak'] / MIB:.0f} | {result['peak'] / max(baseline['peak'], 1):.2f}x |"
            )
            print(rows[-1], flush=True)
    header = report_header(
        "InfoNCE per rank on K processes",
        args.device,
        load_at_start,
        [
            f"global batch B = {args.batch} queries with one hard negative each (N = 2B "
            f"documents), D = {args.dim}, fp32, temperature 0.05; the chunked torch loss "
            "on CPU, the fused kernel on CUDA",
            f"times: median of {args.repeats} steps after a warm-up; memory: the first measured "
            "step",
        ],
    )
    report = "\n".join(header + rows) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
