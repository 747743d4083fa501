"""Rotary position embeddings with Llama-3.1 frequency scaling.

Matches Hugging Face's ``LlamaRotaryEmbedding`` (non-interleaved "rotate half"
layout, cos/sin computed in float32) so the frozen text tower reproduces the
base model exactly.
"""

from __future__ import annotations

import math

import torch

from megafusion.config.schema import RopeScalingConfig


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, with optional llama3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "none":
        return inv_freq
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are divided by `factor`, short ones kept,
    # and the band in between is interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [b, s, head_dim] for integer positions [b, s]."""
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, s, d] by cos/sin [b, s, d]."""
    cos = cos.unsqueeze(1)  # [b, 1, s, d]
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
