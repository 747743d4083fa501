"""A small diffusers AutoencoderKL for tests and the demo (no VAE can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch

from megafusion.demo.vae_training import build_vae
from megafusion.durable import publish


def write_random_vae(path: str | Path, downsample: int = 4, latent_channels: int = 4, seed: int = 0) -> Path:
    """Save a random-weight AutoencoderKL whose spatial factor is ``downsample`` (a power of two)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(downsample, latent_channels)
    tmp = path.with_name(path.name + ".tmp")
    vae.save_pretrained(tmp)
    publish(tmp, path)
    return path
