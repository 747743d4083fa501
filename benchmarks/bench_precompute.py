"""Latent caching throughput: Ray with 1 and 2 encoder workers against a plain single-process loop.

    python benchmarks/bench_precompute.py [--images 480] [--resolution 128] [--shards 8]

Same generated shards, same tiny AutoencoderKL, one torch thread per encoder in
every variant (a Ray CPU actor is one core, started with OMP_NUM_THREADS=1, which
this script sets for the plain loop too). The plain loop runs
``process_shard`` over the shards in this process; the Ray runs go through
``megafusion.data.latent_pipeline.run`` (actor start-up, VAE loading, scheduling,
writing included; the local Ray instance is started before timing).
Prints images/s of each and the ratios ray1/plain (target overhead <= 10%) and
ray2/ray1 (target >= 1.6 on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
# Ray starts a 1-CPU actor with OMP_NUM_THREADS=1; the plain loop gets the same environment.
os.environ["OMP_NUM_THREADS"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3840)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import ray
    import torch

    from megafusion.data.latent_cache import CacheOptions, expand_inputs, load_vae, process_shard
    from megafusion.data.latent_pipeline import run
    from megafusion.demo.shapes import write_shards
    from megafusion.demo.tiny_vae import write_random_vae

    root = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    write_shards(root / "in", args.images, shard_size=args.images // args.shards, size=args.resolution)
    vae_dir = write_random_vae(root / "vae", downsample=8)
    pattern = str(root / "in" / "shapes-*.tar")
    opts = CacheOptions(resolution=args.resolution, batch_size=args.batch_size)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    vae = load_vae(str(vae_dir), torch.device("cpu"))
    (root / "plain").mkdir()
    n = 0
    for i, url in enumerate(expand_inputs(pattern)):
        n += process_shard(vae, url, root / "plain" / f"latents-{i:06d}.tar", opts)["out"]
    plain = n / (time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    for workers in (1, 2):
        out = root / f"ray{workers}"
        t0 = time.perf_counter()
        summary = run(pattern, str(out), str(vae_dir), opts, workers, log=lambda s: None)
        rates[workers] = summary["out"] / (time.perf_counter() - t0)
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.images} images at {args.resolution}px in {args.shards} shards, tiny AutoencoderKL (f=8), "
        f"batch {args.batch_size}, 1 thread per encoder"
    )
    print(f"  plain loop      {plain:8.1f} images/s")
    print(f"  ray, 1 worker   {rates[1]:8.1f} images/s")
    print(f"  ray, 2 workers  {rates[2]:8.1f} images/s")
    print(f"ratio ray1/plain = {rates[1] / plain:.3f}   (target >= 0.90, i.e. overhead <= 10%)")
    print(f"ratio ray2/ray1  = {rates[2] / rates[1]:.3f}   (target >= 1.6)")


if __name__ == "__main__":
    main()
