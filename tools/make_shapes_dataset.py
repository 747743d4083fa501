#!/usr/bin/env python
"""Write the bundled tiny image-caption dataset (coloured shapes at positions) as webdataset shards.

python tools/make_shapes_dataset.py --output data/shapes --num 2000 --shard-size 500 --size 64
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
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from megafusion.demo.shapes import write_shards

    paths = write_shards(args.output, args.num, args.shard_size, args.seed, args.size)
    print(f"wrote {args.num} samples in {len(paths)} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
