"""A small diffusers AutoencoderKL for tests and the demo (no VAE can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_vae(path: str | Path, downsample: int = 4, latent_channels: int = 4, seed: int = 0) -> Path:
    """Save a random-weight AutoencoderKL whose spatial factor is ``downsample`` (a power of two)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    levels = downsample.bit_length()  # 4 -> 3 blocks (two downsamplings)
    if 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample={downsample} must be a power of two")
    chans = tuple([32] + [64] * (levels - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=chans,
            latent_channels=latent_channels, layers_per_block=1, norm_num_groups=32, sample_size=64,
        )
    tmp = path.with_name(path.name + ".tmp")
    vae.save_pretrained(tmp)
    tmp.rename(path)
    return path
