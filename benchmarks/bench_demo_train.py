"""The main job's training stages: today's demo preset vs the one before issue 19, side by side.

    python benchmarks/bench_demo_train.py [--run-dir runs/bench_demo] [--models llamafusion transfusion]
                                          [--steps-fraction 1.0] [--nproc 2]

First the demo's data stages (``launcher.demo --data-only``: shapes, VAE, base Llama,
conversion, latents; skipped where present), then each model's training stage exactly
as ``make demo`` runs it (``torchrun -m launcher.train``, DP=2 gloo ranks, checkpoints,
the same data), once with ``benchmarks/configs/demo_before_issue19.yaml`` and once with
``--config demo``, old and new alternating so that a machine slowing down mid-run hits
both. Prints each stage's wall time, its steps and the steady step rate (from the
trainer's metrics.jsonl), and the ratio new/old of the summed stage times
(issue 19's target: <= 0.55 with both models).

``--steps-fraction`` scales both presets' steps (a quick check of the script, not the
measurement: start-up does not scale). The full default run takes about 25 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD = str(ROOT / "benchmarks" / "configs" / "demo_before_issue19.yaml")
NEW = "demo"
MODELS = ("llamafusion", "transfusion")


def _samples_per_s(metrics: Path) -> float:
    """Median samples/s of the logged steps after the first tenth (start-up excluded), from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    per = sorted(r["samples_per_s"] for r in rows[len(rows) // 10 :] if r.get("samples_per_s"))
    return per[len(per) // 2] if per else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench_demo")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--steps-fraction", type=float, default=1.0)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()

    from launcher.demo import train_command
    from megafusion.config import load_config

    run = (ROOT / args.run_dir).resolve()
    subprocess.run([sys.executable, "-m", "launcher.demo", "--run-dir", str(run), "--data-only"], cwd=ROOT, check=True)
    presets = {"old": OLD, "new": NEW}
    cfgs = {k: load_config(v) for k, v in presets.items()}
    steps = {k: max(1, round(c.optim.train_steps * args.steps_fraction)) for k, c in cfgs.items()}
    seconds: dict[tuple[str, str], float] = {}
    for name in args.models:
        for which, config in presets.items():
            out = run / "bench" / f"{which}_{name}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: no resume from an earlier bench
            cmd = train_command(run, name, config, args.nproc, 1, out, [f"optim.train_steps={steps[which]}"])
            print(f"[bench] {which} {name}: {steps[which]} steps", flush=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            seconds[which, name] = time.time() - t0
            batch = cfgs[which].data.global_batch_size
            step_s = batch / _samples_per_s(out / "metrics.jsonl")
            print(
                f"[bench] {which} {name}: stage {seconds[which, name]:.1f} s, {steps[which]} steps, "
                f"steady {step_s:.3f} s/step ({batch * cfgs[which].data.seq_length / step_s:.0f} tok/s)",
                flush=True,
            )
    total = {w: sum(seconds[w, n] for n in args.models) for w in presets}
    print(
        f"training stages ({', '.join(args.models)}): old {total['old']:.1f} s ({OLD}, {steps['old']} steps), "
        f"new {total['new']:.1f} s (demo preset, {steps['new']} steps)"
    )
    print(f"ratio new/old = {total['new'] / total['old']:.3f}   (target <= 0.55)")


if __name__ == "__main__":
    main()
