"""Checkpoint saves: how long the training loop is blocked, and the write throughput, side by side.

    python benchmarks/bench_checkpoint.py [--hidden 1024] [--layers 8] [--repeats 2]

Builds the real trainer on one gloo rank (a random HF Llama of the given size; ~1.5 GB of
checkpoint at the defaults: trainable image tower + U-Nets in fp32, plus fp32 master and two Adam
moments), then measures in one run, on the same disk:

  sync   : a synchronous save (checkpoint.async_save=false): the loop waits for all of it
  async  : the asynchronous save: the loop waits for the host snapshot only (``blocked``); the
           writer's total time is measured to its publication (``wait``)
  copy   : shutil.copyfile of the same checkpoint's files, each fsynced

and prints blocked/sync (target <= 0.2) and async save throughput / copy throughput (target >= 0.5).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench_reshard import copy_fsynced  # noqa: E402 (the same plain-copy baseline as the reshard benchmark)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.checkpointing import CheckpointSaver
    from megafusion.training.trainer import Trainer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    dims = [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={args.ffn}",
        f"model.num_attention_heads={args.hidden // 64}",
        f"model.num_kv_heads={args.hidden // 128}",
    ]
    base = [
        "data.seq_length=64",
        "data.micro_batch_size=1",
        "data.global_batch_size=1",
        "logging.tensorboard=false",
        f"logging.run_dir={work / 'run'}",
        "checkpoint.keep=1",
    ]
    cfg = load_config("tiny", dims + base)
    hf = write_random_hf_llama(cfg.model, work / "base", seed=0, max_params=None)
    init_model_parallel(1, 1)
    print(f"[bench] building the trainer ({args.hidden} hidden, {args.layers} layers) and one step...", flush=True)
    trainer = Trainer(cfg, str(hf), log=lambda s: None)
    trainer.run(1)  # Adam moments exist from here on
    sync_saver = CheckpointSaver(work / "sync", cfg, lambda s: None, async_save=False)
    async_saver = CheckpointSaver(work / "async", cfg, lambda s: None, async_save=True)
    model, opt = trainer.engine.module, trainer.optimizer
    syncs, blocked, totals, copies = [], [], [], []
    size = 0
    for i in range(args.repeats):
        os.sync()
        t0 = time.perf_counter()
        sync_saver.save(100 + i, model, opt, {})
        syncs.append(time.perf_counter() - t0)

        os.sync()
        t0 = time.perf_counter()
        async_saver.save(100 + i, model, opt, {})
        blocked.append(time.perf_counter() - t0)
        path = async_saver.wait()
        totals.append(time.perf_counter() - t0)

        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        os.sync()
        copies.append(copy_fsynced(path, work / f"copy{i}"))
        shutil.rmtree(work / f"copy{i}")
    sync_s, blocked_s, total_s, copy_s = min(syncs), min(blocked), min(totals), min(copies)
    print(f"checkpoint {size / 2**20:.0f} MiB, best of {args.repeats}")
    print(f"sync save        : {sync_s:.2f} s  ({size / sync_s / 1e9:.2f} GB/s)  all {[round(x, 2) for x in syncs]}")
    print(f"async: blocked   : {blocked_s:.2f} s  all {[round(x, 2) for x in blocked]}")
    print(f"async: published : {total_s:.2f} s  ({size / total_s / 1e9:.2f} GB/s)  all {[round(x, 2) for x in totals]}")
    print(f"copy + fsync     : {copy_s:.2f} s  ({size / copy_s / 1e9:.2f} GB/s)  all {[round(x, 2) for x in copies]}")
    print(f"ratio blocked/sync = {blocked_s / sync_s:.3f}  (target <= 0.2)")
    print(f"ratio save throughput/copy = {copy_s / total_s:.3f}  (target >= 0.5)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
