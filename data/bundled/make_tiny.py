"""Rebuild data/bundled/tiny/ from the bundled SciFact and STS-B copies (deterministic).

    python data/bundled/make_tiny.py [OUT_DIR]     # OUT_DIR defaults to data/bundled/tiny

tiny/ is what ``debug=tiny`` trains and evaluates on: 100 SciFact train queries (enough for
the default 80 held-out dev queries plus 20 to train on) and 10 test queries, their judged
abstracts plus 40 random others, and the first 40 pairs of each STS-B split, in one folder
so that both the BEIR and the STS readers find their files there.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from biencoder.data.beir import load_beir
from biencoder.data.paths import SCIFACT_DIR, STSB_DIR, TINY_DIR

QUERIES = {"train": 100, "test": 10}
DISTRACTORS = 40
STS_ROWS = 40
SEED = 0


def _write_gz(path: Path, lines: list[str]) -> None:
    # mtime=0 keeps the archive bytes a function of its contents alone.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))


def main(out: Path = TINY_DIR) -> None:
    rng = random.Random(SEED)
    splits = {split: load_beir(SCIFACT_DIR, split) for split in QUERIES}
    chosen = {
        split: sorted(rng.sample(sorted(ds.qrels), QUERIES[split])) for split, ds in splits.items()
    }
    corpus = splits["train"].corpus
    judged = {d for split, ids in chosen.items() for q in ids for d in splits[split].qrels[q]}
    others = sorted(set(corpus) - judged)
    docs = sorted(judged | set(rng.sample(others, DISTRACTORS)))

    (out / "qrels").mkdir(parents=True, exist_ok=True)
    _write_gz(
        out / "corpus.jsonl.gz",
        [json.dumps({"_id": d, "title": corpus[d].title, "text": corpus[d].text}) for d in docs],
    )
    _write_gz(
        out / "queries.jsonl.gz",
        [
            json.dumps({"_id": q, "text": splits[split].queries[q]})
            for split, ids in chosen.items()
            for q in ids
        ],
    )
    for split, ids in chosen.items():
        rows = [f"{q}\t{d}\t{r}" for q in ids for d, r in sorted(splits[split].qrels[q].items())]
        (out / "qrels" / f"{split}.tsv").write_text(
            "\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n"
        )
    for split in ("train", "dev", "test"):
        with gzip.open(STSB_DIR / f"sts-{split}.csv.gz", "rt", encoding="utf-8") as f:
            rows = f.read().splitlines()[:STS_ROWS]
        _write_gz(out / f"sts-{split}.csv.gz", rows)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_DIR)
