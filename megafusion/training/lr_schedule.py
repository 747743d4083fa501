"""Linear warmup then cosine decay to min_lr (paper: 4000 warmup steps, 1e-4 -> 1.5e-5)."""

from __future__ import annotations

import math

from megafusion.config.schema import OptimConfig


def learning_rate(o: OptimConfig, step: int) -> float:
    """LR for optimizer step ``step`` (0-based)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = min(1.0, (step - o.warmup_steps) / max(1, o.train_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))
