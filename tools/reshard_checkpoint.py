#!/usr/bin/env python
"""Re-cut a megafusion checkpoint for another TP x PP (x VPP) layout, optimizer state included.

    python tools/reshard_checkpoint.py --in runs/a/checkpoints/step_00001000 --out ckpt/tp1_pp1 --tp 1 --pp 1 --dp 2
    python -m launcher.train --config ... parallel.tensor_parallel=1 checkpoint.load=ckpt/tp1_pp1

Model weights are re-cut per TP/PP shard; the ZeRO optimizer state (fp32 master, Adam moments)
is written per parameter, and each rank of the resumed run cuts its own partition for whatever
DP size it runs with (--dp only checks that the global batch still divides). Every input shard
is verified against the input's index.json first; the output is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--in",
        dest="inp",
        required=True,
        help="checkpoint directory (a step_XXXXXXXX folder or a save directory with a `latest` pointer)",
    )
    ap.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel size the resumed run will use (checked)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from megafusion.checkpoint.files import CheckpointError, latest_checkpoint
    from megafusion.checkpoint.reshard import reshard_checkpoint
    from megafusion.checkpoint.tensor_file import TensorFileError
    from megafusion.config import ConfigError

    for name, v in (("--tp", args.tp), ("--pp", args.pp), ("--vpp", args.vpp or 1), ("--dp", args.dp or 1)):
        if v < 1:
            print(f"error: {name} must be >= 1, got {v}", file=sys.stderr)
            return 2
    try:
        src = Path(args.inp)
        if not (src / "meta.json").is_file() and (src / "latest").is_file():
            src = latest_checkpoint(src)
        reshard_checkpoint(src, args.out, args.tp, args.pp, args.vpp, args.dp, progress=not args.no_progress)
    except (CheckpointError, TensorFileError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
