"""The one training entry point.

    python -m launcher.train --config PRESET_OR_YAML [key.sub=value ...]
    python -m launcher.train --check --config ...          (validate only, e.g. in a batch script before srun)
    torchrun --standalone --nproc-per-node 2 -m launcher.train --config tiny parallel.tensor_parallel=2
    srun python -m launcher.train --config llama3-70b-fusion ...      (RANK/WORLD_SIZE from SLURM_*)

The config is loaded and validated (against the world size from torchrun/srun)
before any process group or model exists. ``parallel.device`` / ``parallel.params_dtype`` /
``parallel.backend`` choose the placement (auto: CUDA, bf16 and NCCL when CUDA is available;
the CPU, fp32 and gloo without); a setting this rank cannot honour (``cuda`` without CUDA,
LOCAL_RANK beyond the visible GPUs) stops it with one line before any process group exists.
A run resumes from ``<checkpoint.save>/latest`` when it exists; SIGTERM/SIGUSR1
save a checkpoint and exit cleanly (exit code 0). They are caught from the start: one that
arrives before the first step (imports, rendezvous, model build, resume) exits 0 without a
save, leaving the previous checkpoint ``latest``, so the SLURM script requeues the job.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def check_base_llama(cfg) -> None:
    """The config's model dims against ``checkpoint.hf_llama`` and ``checkpoint.load``, before any process group.

    A mismatch would otherwise show up on every rank as a shape error deep in the model build or
    the checkpoint load; here it is one line naming both values.
    """
    from megafusion.checkpoint.files import CheckpointError, latest_checkpoint, read_checkpoint_files
    from megafusion.checkpoint.shapes import MODEL_DIMS, differing_dims, dim_conflicts
    from megafusion.config import ConfigError

    if cfg.checkpoint.hf_llama:
        bad = dim_conflicts(cfg.model, cfg.checkpoint.hf_llama)
        if bad:
            raise ConfigError(
                "; ".join(bad) + " (use the config.yaml tools/convert_hf_llama.py wrote, or set these model.* keys)"
            )
    if cfg.checkpoint.load:
        path = latest_checkpoint(cfg.checkpoint.load) or Path(cfg.checkpoint.load)
        if (path / "config.yaml").is_file():
            try:
                _, _, saved = read_checkpoint_files(path)
            except CheckpointError as exc:
                raise ConfigError(f"checkpoint.load={cfg.checkpoint.load}: {exc}") from None
            bad = [
                f"model.{k}={a} in the config, {b} in {path / 'config.yaml'}"
                for k, a, b in differing_dims(cfg.model, saved.model, (*MODEL_DIMS, "boi_token_id", "eoi_token_id"))
            ]
            if bad:
                raise ConfigError(f"checkpoint.load={cfg.checkpoint.load} is of another model: " + "; ".join(bad))


def main(argv: list[str] | None = None) -> int:
    # First of all: a preemption signal during start-up must not kill the run (training/preemption.py).
    from megafusion.training.preemption import StopSignal

    stop = StopSignal().install()
    from megafusion.console import quiet_known_warnings, silence_other_ranks

    quiet_note = quiet_known_warnings()  # before megatron-core / DeepSpeed are imported: they warn at import
    ap = argparse.ArgumentParser(
        prog="python -m launcher.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="preset name (tiny, llama3-8b-fusion, ...) or YAML path")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument(
        "--check",
        action="store_true",
        help="only validate the config for this world size (WORLD_SIZE/SLURM_NTASKS) and exit",
    )
    args = ap.parse_args(argv)

    from megafusion.config import ConfigError, dump_config, load_config, validate_config
    from megafusion.parallel.rank_env import node_address, rank_env

    ranks = rank_env()  # torchrun's RANK/WORLD_SIZE, or srun's SLURM_PROCID/SLURM_NTASKS (parallel/rank_env.py)
    world = ranks.world_size
    try:
        cfg = validate_config(load_config(args.config, args.overrides), world_size=world)
        check_base_llama(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"[launcher] config {cfg.name!r} valid for world size {world}")
        return 0

    run_dir = Path(cfg.logging.run_dir)
    rank = ranks.rank
    silence_other_ranks(rank, cfg.logging.all_ranks)
    if rank == 0:
        print(quiet_note + ("" if cfg.logging.all_ranks else "; other ranks' warnings off (logging.all_ranks=true)"))
        dump_config(cfg, run_dir / "config.yaml")
        print(
            f"[launcher] config {cfg.name!r} valid for world size {world}; "
            f"resolved config -> {run_dir / 'config.yaml'}",
            flush=True,
        )

    import torch.distributed as dist

    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import NonFiniteError, Trainer

    hf_dir = cfg.checkpoint.hf_llama
    if not hf_dir:
        hf_dir = str(run_dir / "base_llama")
        if rank == 0:
            write_random_hf_llama(cfg.model, hf_dir, seed=cfg.seed)
            print(f"[launcher] checkpoint.hf_llama unset: using a random-weight HF Llama in {hf_dir}", flush=True)
    init_model_parallel(
        cfg.parallel.tensor_parallel,
        cfg.parallel.pipeline_parallel,
        cfg.parallel.virtual_pipeline_stages,
        backend=cfg.parallel.backend,
        device=cfg.parallel.device,
        params_dtype=cfg.parallel.params_dtype,
        timeout_s=cfg.parallel.collective_timeout_s,
    )
    # one line per rank: where it ran (a multi-node run shows every node and the address gloo/NCCL use)
    host, addr = node_address()
    print(
        f"[launcher] rank {rank}/{world} local {ranks.local_rank} on {host} ({addr}), "
        f"rendezvous {os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}",
        flush=True,
    )
    dist.barrier()
    if rank == 0:
        print(f"[launcher] {world} ranks joined; building the model", flush=True)
    trainer = Trainer(cfg, hf_dir, log=lambda s: print(s, flush=True), stop=stop)
    trainer.maybe_resume()
    trainer.describe()
    t0 = time.time()
    code = 0
    try:
        history = trainer.run()
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 3
        history = trainer.history
    if rank == 0 and history:
        print(
            f"[launcher] {len(history)} steps in {time.time() - t0:.1f}s, loss {history[0].loss:.4f} -> "
            f"{history[-1].loss:.4f}; run folder {run_dir}",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
