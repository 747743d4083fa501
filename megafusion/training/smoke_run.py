"""Forward/backward smoke run of LlamaFusion on synthetic packed batches.

This is what ``python -m launcher.train`` runs until the pipeline-scheduled
DeepSpeed trainer lands: the real model at the configured TP size, the real
objective (LM cross-entropy + lambda * epsilon MSE under the cosine schedule),
plain torch AdamW on the trainable (image-side) parameters, and data-parallel
gradient averaging by all-reduce.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megafusion.config.schema import Config
from megafusion.data.synthetic import synthetic_batch
from megafusion.diffusion.schedule import CosineSchedule
from megafusion.model.llamafusion import LlamaFusion
from megafusion.parallel.grads import allreduce_sequence_parallel_grads
from megafusion.parallel.process_groups import ParallelContext


def _lr(cfg: Config, step: int) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / max(1, o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / max(1, o.train_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


def run_smoke(cfg: Config, hf_dir: str, run_dir: Path, steps: int, log=print) -> list[float]:
    pctx = ParallelContext.current(cfg.parallel.sequence_parallel)
    model = LlamaFusion.from_hf_llama(
        hf_dir, image=cfg.model.image, pctx=pctx, seed=cfg.seed,
        boi_token_id=cfg.model.boi_token_id, eoi_token_id=cfg.model.eoi_token_id,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        attention_backend=cfg.model.attention_backend, params_dtype=cfg.model.params_dtype,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    o = cfg.optim
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    sched = CosineSchedule(cfg.diffusion.num_timesteps)
    dp_group, dp_rank = ps.get_data_parallel_group(), ps.get_data_parallel_rank()
    dp_size = dist.get_world_size(dp_group)
    rank0 = dist.get_rank() == 0
    if rank0:
        log(f"[smoke] trainable {n_train / 1e6:.2f}M params, frozen text tower {n_frozen / 1e6:.2f}M "
            f"(per TP rank), TP={pctx.tp_size} DP={dp_size} SP={pctx.sequence_parallel}")
    device = next(model.parameters()).device
    losses = []
    t0 = time.time()
    for step in range(steps):
        clean = synthetic_batch(cfg, seed=cfg.seed * 1000003 + step * 131 + dp_rank)
        g = torch.Generator().manual_seed(cfg.seed + step * 7 + dp_rank)
        noise = torch.randn(clean.latents.shape, generator=g)
        batch = replace(clean, latents=sched.add_noise(clean.latents, noise, clean.timesteps)).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        out = model(batch)
        diff = torch.nn.functional.mse_loss(out.image_pred.float(), noise.to(device))
        loss = out.lm_loss + cfg.diffusion.loss_weight * diff
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_sequence_parallel_grads(model, pctx.tp_group)
        if dp_size > 1:
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(dp_size)
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, o.clip_grad)
        opt.step()
        stats = torch.stack([loss.detach(), out.lm_loss.detach(), diff.detach()])
        if dp_size > 1:
            dist.all_reduce(stats, group=dp_group)
            stats /= dp_size
        losses.append(float(stats[0]))
        if rank0 and (step % cfg.logging.log_interval == 0 or step == steps - 1):
            el = time.time() - t0
            toks = (step + 1) * batch.input_ids.numel() * dp_size / el
            log(f"step {step + 1:>5}/{steps} loss {stats[0]:.4f} lm_loss {stats[1]:.4f} "
                f"diffusion_loss {stats[2]:.4f} grad_norm {float(gnorm):.3f} lr {_lr(cfg, step):.2e} "
                f"tok/s {toks:.0f} eta {el / (step + 1) * (steps - step - 1):.0f}s")
    if rank0:
        (run_dir / "smoke_metrics.json").write_text(json.dumps({"losses": losses, "steps": steps}, indent=1))
    return losses
