"""Where the bundled data lies: compressed copies of SciFact (BEIR layout) and the STS
Benchmark, so that a fresh clone trains and evaluates without downloads (sources and
licences in ``bundled/README.md``)."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SCIFACT_DIR = BUNDLED_DIR / "scifact"
STSB_DIR = BUNDLED_DIR / "stsbenchmark"
# 100 SciFact train and 10 test queries with 158 abstracts, 40 STS-B pairs per split: debug=tiny.
TINY_DIR = BUNDLED_DIR / "tiny"
