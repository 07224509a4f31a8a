"""Every record in bench/results/ names a commit of this repository it was measured at, so
that a figure can be traced to the code that produced it (and re-measured there)."""

import re
import subprocess

import pytest
from configs import ROOT

RESULTS = ROOT / "bench" / "results"
RECORDS = sorted(p for p in RESULTS.rglob("*.md") if p.name != "comparison.md")
HASH = re.compile(r"\b[0-9a-f]{7,40}\b")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def is_commit(name: str) -> bool:
    return git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}").returncode == 0


@pytest.mark.skipif(
    git("rev-parse", "--is-shallow-repository").stdout.strip() != "false",
    reason="needs the repository's whole history (not a shallow clone or an unpacked copy)",
)
@pytest.mark.parametrize("record", RECORDS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_record_names_the_commit_it_was_measured_at(record):
    named = set(HASH.findall(record.read_text()))
    assert any(is_commit(h) for h in named), (
        f"{record}: names no commit of this repository (write 'commit: <hash>')"
    )
