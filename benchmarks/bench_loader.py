"""Loader throughput: packed sequences/s from latent shards against what a training step consumes.

    python benchmarks/bench_loader.py [--samples 2000] [--workers 2]

Builds the shapes dataset, encodes it with a tiny VAE (Ray, 2 workers), then
measures, side by side in one run: the loader's packed sequences/s (0 workers
and --workers workers) and the tiny preset's training consumption in
sequences/s (the real Trainer, fed synthetic batches of the same shape so the
loader does not cap the rate it is compared with). Prints loader/consumption
ratios (> 1 means the loader keeps up).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()

    from megafusion.config import load_config
    from megafusion.data.latent_cache import CacheOptions
    from megafusion.data.latent_pipeline import run
    from megafusion.data.loader import make_loader
    from megafusion.demo.shapes import write_shards
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.demo.tiny_vae import write_random_vae
    from megafusion.demo.tokenizer import write_word_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    write_shards(root / "in", args.samples, shard_size=max(1, args.samples // 8), size=64)
    vae = write_random_vae(root / "vae", downsample=4)
    run(
        str(root / "in" / "*.tar"),
        str(root / "lat"),
        str(vae),
        CacheOptions(resolution=32, batch_size=32),
        2,
        log=lambda s: None,
    )
    import ray

    ray.shutdown()
    tok = write_word_tokenizer(root / "tok")
    base = [
        f"data.path={root}/lat/latents-*.tar",
        f"data.tokenizer={tok}",
        f"logging.run_dir={root}/run",
        "logging.tensorboard=false",
        "checkpoint.interval=1000000",
    ]

    rates = {}
    for workers in (0, args.workers):
        cfg = load_config("tiny", base + [f"data.num_workers={workers}"])
        it = iter(make_loader(cfg, 0, 1))
        next(it)  # start-up (worker spawn) is not throughput
        t0 = time.perf_counter()
        seqs = sum(next(it).input_ids.shape[0] for _ in range(args.batches))
        rates[workers] = seqs / (time.perf_counter() - t0)

    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    # consumption on synthetic batches of the same shape, so the loader cannot cap what is measured
    cfg = load_config(
        "tiny", [f"logging.run_dir={root}/run", "logging.tensorboard=false", "checkpoint.interval=1000000"]
    )
    hf = write_random_hf_llama(cfg.model, root / "llama")
    init_model_parallel(1, 1)
    trainer = Trainer(cfg, str(hf), log=lambda s: None)
    trainer.train_step()
    steps = 10
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    consumed = steps * cfg.data.global_batch_size / (time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"tiny preset: seq {cfg.data.seq_length}, micro-batch {cfg.data.micro_batch_size}, "
        f"global batch {cfg.data.global_batch_size}; {args.samples} shapes samples"
    )
    for w, r in rates.items():
        print(f"  loader, {w} workers   {r:8.1f} sequences/s")
    print(f"  training consumes    {consumed:8.1f} sequences/s (synthetic batches of the same shape)")
    for w, r in rates.items():
        print(f"ratio loader({w} workers)/consumption = {r / consumed:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
