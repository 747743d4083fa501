#!/usr/bin/env python
"""Write the bundled editing set (a shape, an instruction changing one attribute, the edited shape) as shards.

python tools/make_shapes_edits.py --output data/edits --num 2000 --shard-size 500 --size 64
python tools/make_shapes_edits.py --output data/edits_held_out --split held_out --num 60

Each sample holds src.png, tgt.png, txt (the instruction) and json (both attribute sets); encode
them with ``tools/precompute_latents.py --edit``. Held-out edits are combinations never in 'train'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--split", choices=("train", "held_out"), default="train")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from megafusion.demo.shape_edits import write_edit_shards

    paths = write_edit_shards(args.output, args.num, args.shard_size, args.split, args.seed, args.size)
    print(f"wrote {args.num} {args.split} editing triples in {len(paths)} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
