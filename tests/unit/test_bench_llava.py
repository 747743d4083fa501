"""benchmarks/bench_llava_step.py runs end to end on tiny widths (a smoke test, no timing claims)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_llava_step_smoke():
    tiny = [
        "--vocab", "512", "--hidden", "64", "--ffn", "96", "--layers", "1", "--heads", "4", "--kv-heads", "2",
        "--vision-hidden", "32", "--vision-layers", "2", "--vision-heads", "4", "--picture-size", "28",
        "--patch", "7", "--image-size", "64", "--seq", "128", "--repeats", "1",
    ]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_llava_step.py", *tiny],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ratio llava/llama = " in out and "extra/forward = " in out, out
    # the frozen vision path: no graph, no trainable parameter, no gradient
    assert (
        "vision features requires_grad=False grad_fn=None; vision params trainable 0, with a .grad after backward 0"
        in out
    )
    assert "1/2 layers run" in out and "-> 16 features" in out
