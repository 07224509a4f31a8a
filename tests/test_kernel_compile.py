"""Every Triton InfoNCE kernel variant compiles for Hopper (sm_90a), on a CPU machine.

The interpreter that runs the kernels in the other tests never calls Triton's code
generator, so errors only the compiler raises (inconsistent return types, for one) would
first show on a GPU. The kernels of this test session are decorated for the interpreter
(conftest.py sets TRITON_INTERPRET=1), so the compilation runs in a subprocess without it;
see kernels/compile_check.py. Run with -s to see the table of shared memory, registers,
spills and tensor-core instructions per variant.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.compile_check import HOPPER_MAX_SHARED_BYTES

REPO = Path(__file__).resolve().parents[1]


def compile_in_subprocess(*args: str) -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    process = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        report = json.loads(process.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"kernels.compile_check crashed (rc {process.returncode}):\n{process.stderr}")
    if "unavailable" in report:
        pytest.skip(f"cannot compile for sm_90 here: {report['unavailable']}")
    print(f"\n{report['table']}")
    return report["results"]


@pytest.mark.parametrize(
    "subset",
    [pytest.param((), id="fast"), pytest.param(("--all",), id="all", marks=pytest.mark.slow)],
)
def test_every_kernel_variant_compiles_for_hopper(subset):
    """fast: each kernel per dtype with every flag on (~15 s); all: every flag combination."""
    results = compile_in_subprocess(*subset)
    assert results
    failed = [f"{r['variant']}: {r['error']}" for r in results if r["error"] is not None]
    assert not failed, "\n".join(failed)
    too_large = [r["variant"] for r in results if r["shared_bytes"] > HOPPER_MAX_SHARED_BYTES]
    assert not too_large, f"need more shared memory than an sm_90 block has: {too_large}"
    # tf32, fp16 and bf16 tile products are what Hopper's wgmma is for; losing it (a block
    # shape it cannot take, say) would still compile but run at a fraction of the speed.
    without_wgmma = [
        r["variant"] for r in results if "fp32-ieee" not in r["variant"] and r["mma"] != "wgmma"
    ]
    assert not without_wgmma, f"no wgmma: {without_wgmma}"
