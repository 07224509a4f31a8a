"""bench/host_overhead.py at tiny sizes: both libraries' jobs run on the same batches and
the report has a row per job, with finite times and our step's synchronisation bound."""

import logging
import math
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIETED = ("sentence_transformers", "transformers")


def _rows(report: str) -> dict[str, list[str]]:
    """The table's rows by job name, as lists of cells."""
    rows = {}
    for line in report.splitlines():
        if line.startswith(("| ours", "| sentence-transformers")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_host_overhead_reports_ours_and_sentence_transformers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import host_overhead

    out = tmp_path / "report.md"
    flags = "--batch-size 16 --chunk-size 4 --max-length 32 --warmup 0 --steps 1"
    levels = {name: logging.getLogger(name).level for name in QUIETED}
    try:
        report = host_overhead.main([*flags.split(), "--out", str(out)])
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    assert out.read_text() == report
    rows = _rows(report)
    assert sorted(rows) == [
        "ours: Trainer, cache_chunk_size=4",
        "ours: Trainer, cache_chunk_tokens=128",
        "sentence-transformers: CMNRL, mini_batch_size=4",
        "sentence-transformers: CMNRL, mini_batch_size=4, mini_batch_num_tokens=128",
    ]
    for name, cells in rows.items():
        seconds, ratio, syncs, ops = cells[1:5]
        assert math.isfinite(float(seconds)) and float(seconds) > 0, name
        assert float(ratio.rstrip("×")) > 0, name
        assert int(ops.replace(",", "")) > 0, name
        if name.startswith("ours"):
            assert int(syncs) <= 3, name
        # "share% (seconds per 1k examples)"
        tokenization = cells[5].split("(")[1].rstrip(")")
        assert float(tokenization) > 0, name
    assert "ours / ST, chunks of texts:" in report
    assert "ours / ST, chunks of tokens:" in report
