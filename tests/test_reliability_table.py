"""bench/results/reliability.md says what bench/reliability.py prints: every kind the script
defines is in the committed table under its number, and (slow) a fresh run gives each kind
the verdict the table records."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE = REPO_ROOT / "bench" / "results" / "reliability.md"
ROW = re.compile(r"^\| (\d+) \| (.+?) \| `python .*` \| (GOOD|WEAK|BAD) \| ", re.MULTILINE)


def verdicts(report: str) -> dict[int, tuple[str, str]]:
    """Kind number -> (name, verdict), from a report's table."""
    return {int(n): (name, verdict) for n, name, verdict in ROW.findall(report)}


def test_the_committed_table_lists_every_kind_the_script_defines(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import reliability

    names = {number: kind.name for number, kind in enumerate(reliability.kinds(), 1)}
    committed = verdicts(TABLE.read_text())
    assert {n: name for n, (name, _) in committed.items()} == names, (
        "bench/results/reliability.md is out of date: run "
        "python bench/reliability.py --out bench/results/reliability.md"
    )
    assert {verdict for _, verdict in committed.values()} == {"GOOD"}
    summary = f"**{len(names)} GOOD, 0 WEAK, 0 BAD** of {len(names)} kinds"
    assert summary in TABLE.read_text()


@pytest.mark.slow
def test_a_fresh_run_gives_every_kind_the_committed_verdict(tmp_path):
    out = tmp_path / "reliability.md"
    subprocess.run(
        [sys.executable, "bench/reliability.py", "--out", str(out)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=3 * 3600,
    )
    fresh, committed = verdicts(out.read_text()), verdicts(TABLE.read_text())
    differ = {n: (committed.get(n), fresh.get(n)) for n in fresh.keys() | committed.keys()}
    assert {n: pair for n, pair in differ.items() if pair[0] != pair[1]} == {}
