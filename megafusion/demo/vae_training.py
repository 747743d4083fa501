"""Train the small diffusers AutoencoderKL the bundled pipeline encodes images with.

No VAE can be downloaded here, and a random one gives latents from which no model
can learn to draw. This trains one on freshly drawn shapes images (every colour,
shape and position, with jitter) with an L1 + MSE reconstruction loss and a small KL
term, then sets ``scaling_factor`` so the latents have unit standard deviation, as
diffusion expects. Its quality is measured the way the pipeline is scored: the
attributes ``shapes.read_attributes`` reads from reconstructions must match the input's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES, draw_shape, read_attributes
from megafusion.durable import publish


def build_vae(downsample: int = 4, latent_channels: int = 4, channels: int = 32):
    """The pipeline's AutoencoderKL architecture: ``log2(downsample) + 1`` blocks, spatial factor ``downsample``."""
    from diffusers import AutoencoderKL

    levels = downsample.bit_length()  # 4 -> 3 blocks (two downsamplings)
    if downsample < 1 or 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample={downsample} must be a power of two")
    chans = tuple([channels] + [2 * channels] * (levels - 1))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=chans,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, channels),
        sample_size=64,
    )


def shapes_batch(n: int, size: int, rng: random.Random) -> tuple[torch.Tensor, list[dict]]:
    """n random shapes images [n, 3, size, size] in [-1, 1] and their attributes."""
    imgs, attrs = [], []
    for _ in range(n):
        c, s, p = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        im = draw_shape(c, s, p, size=size, jitter=0.03, rng=rng)
        imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        attrs.append({"color": c, "shape": s, "position": p})
    return torch.stack(imgs), attrs


def to_images(x: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] tensors [n, 3, H, W] -> uint8 HWC arrays."""
    return [((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy() for t in x]


@torch.no_grad()
def reconstruction_accuracy(vae, size: int, n: int = 120, seed: int = 12345) -> dict[str, float]:
    """Share of reconstructions whose colour / shape / position read back as the input's."""
    x, attrs = shapes_batch(n, size, random.Random(seed))
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    got = [read_attributes(im) for im in to_images(rec)]
    return {k: sum(g[k] == a[k] for g, a in zip(got, attrs)) / n for k in ("color", "shape", "position")}


def train_vae(
    out_dir: str | Path,
    image_size: int = 32,
    downsample: int = 4,
    latent_channels: int = 4,
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    channels: int = 32,
) -> dict:
    """Train, set the latent scaling, save (atomically) and return {"accuracy", "scaling_factor", "seconds"}."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = build_vae(downsample, latent_channels, channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    vae.train()
    for step in range(1, steps + 1):
        x, _ = shapes_batch(batch_size, image_size, rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log(f"[vae] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        z = vae.encode(shapes_batch(256, image_size, random.Random(seed + 1))[0]).latent_dist.mode()
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    acc = reconstruction_accuracy(vae, image_size)
    tmp = out.with_name(out.name + ".tmp")
    vae.save_pretrained(tmp)
    publish(tmp, out)
    info = {"accuracy": acc, "scaling_factor": scaling, "seconds": round(time.time() - t0, 1)}
    log(
        f"[vae] reconstructions read back: colour {acc['color']:.2f} shape {acc['shape']:.2f} "
        f"position {acc['position']:.2f}; scaling_factor {scaling:.3f}; saved {out}"
    )
    return info
