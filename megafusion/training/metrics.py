"""Peak FLOP/s and memory for MFU, and the per-step log line / TensorBoard scalars.

The FLOPs of a step are counted by ``training.flops`` (shared with the planner).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from megafusion.config.schema import Config

_GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "L40": 181.0}


def peak_flops(cfg: Config) -> float:
    """Per-device peak FLOP/s for MFU."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, val in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return val * 1e12
        return 312e12
    n = 1024  # CPU: the best of several fp32 matmuls stands in for the peak
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class StepStats:
    step: int
    loss: float
    lm_loss: float
    diffusion_loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    samples_per_s: float
    mfu: float
    mem_gb: float
    skipped: int

    def line(self, total_steps: int, eta_s: float | None) -> str:
        eta = f" eta {eta_s / 60:.1f}min" if eta_s is not None else ""
        return (
            f"step {self.step:>6}/{total_steps} loss {self.loss:.4f} lm_loss {self.lm_loss:.4f} "
            f"diffusion_loss {self.diffusion_loss:.4f} grad_norm {self.grad_norm:.3f} lr {self.lr:.3e} "
            f"tok/s {self.tokens_per_s:.0f} samples/s {self.samples_per_s:.2f} mfu {100 * self.mfu:.1f}% "
            f"mem {self.mem_gb:.2f}GB skipped {self.skipped}{eta}"
        )


class ScalarLogger:
    """TensorBoard writer on rank 0 (or nothing)."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def log(self, stats: StepStats) -> None:
        if self.writer is None:
            return
        for key in (
            "loss",
            "lm_loss",
            "diffusion_loss",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "samples_per_s",
            "mfu",
            "mem_gb",
        ):
            self.writer.add_scalar(f"train/{key}", getattr(stats, key), stats.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
