"""Query generation throughput: batched against one document at a time, float32 against
bfloat16, for the generator synthesize.py uses.

    python bench/synthesize.py                              # packaged SmolLM2-135M, SciFact
    python bench/synthesize.py --generator /models/qwen --docs 32 --batch-sizes 1 8 32

Each configuration writes ``--queries`` queries for the same ``--docs`` SciFact abstracts
(the question prompt, cut to 160 words, as experiment=scifact_synthetic) after one warm-up
batch. Prints generated texts per second and the ratio to the first configuration (one
document per call, float32) measured in the same run, and the share of texts the parser
accepts (a dtype that broke the model would show there).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device_name

from biencoder.data.beir import load_corpus
from biencoder.data.paths import SCIFACT_DIR
from biencoder.data.synthesis.generator import QueryGenerator, Sampling
from biencoder.data.synthesis.parsing import parse_query
from biencoder.data.synthesis.prompts import Prompt, builtin_prompt
from biencoder.data.synthesis.run import sample_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default=None, help="model folder or .gguf (packaged)")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--style", default="question")
    args = parser.parse_args()

    corpus = list(load_corpus(SCIFACT_DIR).values())
    docs = sample_documents(corpus, args.docs, seed=1)
    prompt = Prompt.load(builtin_prompt(args.style))
    prompts = [prompt.render(" ".join(d.full_text.split()[:160]), num_examples=0) for d in docs]
    sampling = Sampling()
    print(f"{device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.docs} documents x {args.queries} queries, prompt {prompt.id}\n")
    print("| dtype | documents per call | texts/s | vs first row | parsed |")
    print("|---|---:|---:|---:|---:|")
    baseline = None
    for dtype in args.dtypes:
        generator = QueryGenerator.load(args.generator, dtype=dtype)
        generator.generate(prompts[:2], sampling, num_return=args.queries)  # warm-up
        for batch in args.batch_sizes:
            start = time.perf_counter()
            replies = []
            for i in range(0, len(prompts), batch):
                replies += generator.generate(
                    prompts[i : i + batch], sampling, num_return=args.queries, seed=i
                )
            rate = args.docs * args.queries / (time.perf_counter() - start)
            baseline = baseline or rate
            parsed = sum(
                parse_query(text, doc.full_text, prompt.style)[0] is not None
                for doc, texts in zip(docs, replies, strict=True)
                for text in texts
            )
            print(
                f"| {dtype} | {batch} | {rate:.2f} | {rate / baseline:.2f}x | "
                f"{parsed / (args.docs * args.queries):.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
