#!/usr/bin/env python
"""Encode image-caption webdataset shards into VAE-latent shards with Ray.

    python tools/precompute_latents.py --input 'data/shapes-{000000..000003}.tar' --output data/latents \\
        --vae runs/demo/vae --resolution 32 --batch-size 32 --num-workers 2
    ray job submit --working-dir . -- python tools/precompute_latents.py --input /abs/in/*.tar --output /abs/out \\
        --vae /abs/vae ...
    ray submit cluster/ray_cluster.yaml tools/precompute_latents.py -- --address auto \\
        --input '/shared/shapes/shapes-{000000..000127}.tar' --output /shared/latents --vae /shared/vae ...

--input takes one or more values: a pattern the tool expands itself, or the shards a shell already expanded
it into (``ray submit`` runs the command through the head's login shell, which expands braces and globs).

Reruns skip finished shards (completion records) and redo the rest; bad samples are skipped
and counted by reason in OUTPUT/summary.json.
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
        "--input",
        required=True,
        nargs="+",
        help="shard path(s) or pattern(s): path, directory, glob, brace pattern or fsspec URL; several are joined",
    )
    ap.add_argument("--output", required=True, help="output directory (latent shards, records, summary.json)")
    ap.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    ap.add_argument("--resolution", type=int, default=256, help="center-crop + resize to this many pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=2, help="encoder actors (one GPU or one CPU each)")
    ap.add_argument("--min-size", type=int, default=16, help="skip images whose shorter side is smaller")
    ap.add_argument("--max-pixels", type=int, default=64_000_000, help="skip larger images unread (bombs)")
    ap.add_argument("--sample", action="store_true", help="sample latents instead of the distribution's mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--edit",
        action="store_true",
        help="editing triples: each sample holds src.<img>, tgt.<img> and txt (the instruction); both are encoded",
    )
    ap.add_argument(
        "--keep-pixels",
        type=int,
        default=0,
        metavar="SIZE",
        help="also store each picture at SIZE px (KEY.pixels.npy) for a LLaVA's vision tower "
        "(LLaVA-Fusion: data.vlm_understanding=true; SIZE = its vision_config.image_size)",
    )
    ap.add_argument("--address", default=None, help="Ray address ('auto' on a cluster; default: RAY_ADDRESS or local)")
    ap.add_argument("--max-retries", type=int, default=1, help="re-encodes of a shard whose worker died")
    ap.add_argument("--crash-after-samples", type=int, default=None, help=argparse.SUPPRESS)  # fault injection (tests)
    ap.add_argument("--crash-shard", default=None, help=argparse.SUPPRESS)  # ...only in this output shard
    args = ap.parse_args(argv)

    from megafusion.data.latent_cache import CacheOptions
    from megafusion.data.latent_pipeline import run

    if args.resolution < 8 or args.batch_size < 1 or args.num_workers < 1:
        ap.error("--resolution must be >= 8, --batch-size and --num-workers >= 1")
    if args.keep_pixels < 0:
        ap.error(f"--keep-pixels must be >= 0 (0: no pictures), got {args.keep_pixels}")
    opts = CacheOptions(
        resolution=args.resolution,
        batch_size=args.batch_size,
        min_size=args.min_size,
        max_pixels=args.max_pixels,
        sample=args.sample,
        seed=args.seed,
        keep_pixels=args.keep_pixels,
        edit=args.edit,
    )
    try:
        run(
            args.input,
            args.output,
            args.vae,
            opts,
            args.num_workers,
            args.address,
            args.max_retries,
            args.crash_after_samples,
            log=lambda s: print(s, flush=True),
            crash_shard=args.crash_shard,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
