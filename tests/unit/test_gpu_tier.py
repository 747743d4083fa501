"""The GPU tier (tests/gpu) on a machine without CUDA: collected, every test skipped with its reason.

A tier that silently collects nothing (a typo in a marker, an import error caught somewhere, a
conftest that deselects) would pass on CPU and never run on a GPU machine either: pytest's exit
status 5 ("no tests ran") or an error is what this catches, in a subprocess as ``make test-gpu`` runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REASON = "needs CUDA: run make test-gpu on a GPU machine"


def _gpu_test_count() -> int:
    """Test functions defined in tests/gpu (parametrized ones would count more; there are none)."""
    return sum(len(re.findall(r"^def test_", p.read_text(), re.M)) for p in (ROOT / "tests" / "gpu").glob("test_*.py"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: tests/gpu runs for real (make test-gpu)")
@pytest.mark.parametrize("select", [[], ["-m", "gpu"]], ids=["all", "make-test-gpu"])
def test_gpu_tier_is_collected_and_skipped_with_reason(select):
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *select, "tests/gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"exit {res.returncode} (5 = no tests ran)\n{out[-3000:]}"
    assert "no tests ran" not in out
    n = _gpu_test_count()
    assert n >= 8, n
    m = re.search(r"(\d+) skipped", out)
    assert m and int(m.group(1)) == n, out[-3000:]
    assert not re.search(r"\d+ (passed|failed|errors?)\b", out), out[-3000:]
    assert out.count(REASON) >= 1, out[-3000:]  # -rs: pytest groups identical reasons into one line
