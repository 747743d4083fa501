#!/usr/bin/env python
"""Train the small AutoencoderKL for the bundled shapes data (diffusers format).

    python tools/train_vae.py --out runs/demo/vae --image-size 32 --downsample 4 --steps 800

Images are drawn on the fly (every colour, shape and position, with jitter). Prints the
loss, then how often colour / shape / position read back from reconstructions match
(megafusion.demo.shapes.read_attributes), and sets scaling_factor for unit-std latents.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--downsample", type=int, default=4, help="spatial factor (a power of two)")
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.image_size % args.downsample:
        print(
            f"error: --image-size {args.image_size} is not divisible by --downsample {args.downsample}", file=sys.stderr
        )
        return 2

    from megafusion.demo.vae_training import train_vae

    try:
        info = train_vae(
            args.out,
            args.image_size,
            args.downsample,
            args.latent_channels,
            args.steps,
            args.batch_size,
            args.lr,
            args.kl_weight,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(args.out) / "training.json").write_text(json.dumps({**info, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
