"""Image latents in and out of the transformer.

Paper setup: a 256 px image -> 32x32x4 VAE latent -> a U-Net down-sampler of 2
blocks (32x32 then 16x16) -> 256 tokens of the LLM width; on the way out, a
U-Net up-sampler with skip connections from the down path predicts the noise.
The diffusion timestep conditions every block. The linear patchifier (patch 2,
timestep embedding added) is the cheap alternative selected by
``model.image.io=linear``.

Both variants expose the same two calls:
    encode(latents [n, C, H, W], t [n]) -> tokens [n, T, hidden], skips
    decode(tokens  [n, T, hidden], t [n], skips) -> eps [n, C, H, W]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megafusion.config.schema import ImageConfig
from megafusion.model.norm import RMSNorm

Skips = list[torch.Tensor] | None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [n, dim] of (possibly fractional) timesteps [n]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed position embedding [side*side, dim] of a raster-ordered token grid.

    The first half of the channels encodes the row, the second the column, each as
    sines and cosines of geometric frequencies (the MAE/DiT layout). Why: the
    sequence's 1-D RoPE tells a text query how far back a token is, not which column
    of the image it sits in; left versus right is then hard to read out of the image.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [side, side] each

    def enc(x: torch.Tensor) -> torch.Tensor:
        ang = x.reshape(-1, 1) * freqs[None, :]  # [T, dim/4]
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # [T, dim/2]

    return torch.cat([enc(rows), enc(cols)], dim=1).float()  # [T, dim]


class PositionEmbedding2D(nn.Module):
    """Adds :func:`sincos_2d` to image tokens; a non-persistent buffer, so checkpoints do not change."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.register_buffer("table", sincos_2d(side, dim), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.table.to(tokens.dtype)  # [n, T, dim] + [T, dim]


def _position_embedding(cfg: ImageConfig, hidden_size: int) -> nn.Module:
    if cfg.position_embedding == "sincos":
        return PositionEmbedding2D(cfg.tokens_per_side, hidden_size)
    return nn.Identity()


def _groups(ch: int) -> int:
    return math.gcd(32, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with an additive timestep projection and a residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [n, C, h, w] -> [n, h*w, C]


def _from_tokens(x: torch.Tensor, side: int) -> torch.Tensor:
    n, t, c = x.shape
    return x.transpose(1, 2).reshape(n, c, side, side)  # [n, T, C] -> [n, C, h, w]


class UNetDown(nn.Module):
    """Latents -> tokens: one ResBlock at latent resolution, then (downsample, ResBlock) per halving."""

    def __init__(self, cfg: ImageConfig, hidden_size: int):
        super().__init__()
        ch = cfg.unet_channels
        n_down = int(math.log2(cfg.patch_size))
        self.t_mlp = TimestepMLP(cfg.timestep_embed_dim, 4 * ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(ch, ch, 4 * ch)])
        self.downs = nn.ModuleList()
        chans = [ch]
        for i in range(n_down):
            out = ch * 2 if i == 0 else chans[-1]
            self.downs.append(nn.Conv2d(chans[-1], chans[-1], 3, stride=2, padding=1))
            self.blocks.append(ResBlock(chans[-1], out, 4 * ch))
            chans.append(out)
        self.channels = chans
        self.norm_out = nn.GroupNorm(_groups(chans[-1]), chans[-1])
        self.proj = nn.Linear(chans[-1], hidden_size)
        self.pos = _position_embedding(cfg, hidden_size)

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        emb = self.t_mlp(t)
        h = self.conv_in(latents)
        skips = []
        h = self.blocks[0](h, emb)
        skips.append(h)
        for down, block in zip(self.downs, self.blocks[1:]):
            h = block(down(h), emb)
            skips.append(h)
        tokens = self.proj(_to_tokens(F.silu(self.norm_out(h))))  # [n, T, hidden]
        return self.pos(tokens), skips


class UNetUp(nn.Module):
    """Tokens -> predicted noise, mirroring UNetDown and concatenating its skips."""

    def __init__(self, cfg: ImageConfig, hidden_size: int, eps: float):
        super().__init__()
        ch = cfg.unet_channels
        n_down = int(math.log2(cfg.patch_size))
        chans = [ch] + [ch * 2] * n_down  # same as UNetDown.channels
        self.side = cfg.tokens_per_side
        self.norm_in = RMSNorm(hidden_size, eps)
        self.t_mlp = TimestepMLP(cfg.timestep_embed_dim, 4 * ch)
        self.proj = nn.Linear(hidden_size, chans[-1])
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level in range(n_down, -1, -1):
            c = chans[level]
            self.blocks.append(ResBlock(c * 2, c, 4 * ch))  # concat skip
            if level > 0:
                self.ups.append(nn.Conv2d(c, chans[level - 1], 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, skips: Skips) -> torch.Tensor:
        assert skips is not None, "UNetUp needs the skips of UNetDown"
        emb = self.t_mlp(t)
        h = _from_tokens(self.proj(self.norm_in(tokens)), self.side)
        for i, block in enumerate(self.blocks):
            h = block(torch.cat([h, skips[-1 - i]], dim=1), emb)
            if i < len(self.ups):
                h = self.ups[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchIn(nn.Module):
    """Linear patchifier: [n, C, H, W] -> [n, (H/p)(W/p), hidden] + timestep embedding."""

    def __init__(self, cfg: ImageConfig, hidden_size: int):
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Linear(cfg.latent_channels * self.p * self.p, hidden_size)
        self.t_mlp = TimestepMLP(cfg.timestep_embed_dim, hidden_size)
        self.pos = _position_embedding(cfg, hidden_size)

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        n, c, hh, ww = latents.shape
        p = self.p
        x = latents.reshape(n, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)  # [n, h, w, C, p, p]
        x = x.reshape(n, (hh // p) * (ww // p), c * p * p)  # [n, T, C*p*p]
        return self.pos(self.proj(x) + self.t_mlp(t)[:, None, :]), None


class PatchOut(nn.Module):
    """Linear unpatchifier: [n, T, hidden] -> [n, C, H, W]."""

    def __init__(self, cfg: ImageConfig, hidden_size: int, eps: float):
        super().__init__()
        self.p, self.c, self.side = cfg.patch_size, cfg.latent_channels, cfg.tokens_per_side
        self.norm_in = RMSNorm(hidden_size, eps)
        self.t_mlp = TimestepMLP(cfg.timestep_embed_dim, hidden_size)
        self.proj = nn.Linear(hidden_size, self.c * self.p * self.p)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, skips: Skips) -> torch.Tensor:
        n = tokens.shape[0]
        p, c, s = self.p, self.c, self.side
        x = self.proj(self.norm_in(tokens) + self.t_mlp(t)[:, None, :])  # [n, T, C*p*p]
        x = x.reshape(n, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5)  # [n, C, h, p, w, p]
        return x.reshape(n, c, s * p, s * p)


def build_image_in(cfg: ImageConfig, hidden_size: int) -> nn.Module:
    return UNetDown(cfg, hidden_size) if cfg.io == "unet" else PatchIn(cfg, hidden_size)


def build_image_out(cfg: ImageConfig, hidden_size: int, eps: float) -> nn.Module:
    return UNetUp(cfg, hidden_size, eps) if cfg.io == "unet" else PatchOut(cfg, hidden_size, eps)


def build_image_io(cfg: ImageConfig, hidden_size: int, eps: float, seed: int) -> tuple[nn.Module, nn.Module]:
    """(image_in, image_out) as every builder makes them: under ``seed``, down-sampler first.

    The U-Nets are replicated over TP and live on different pipeline stages (the last stage
    even keeps a tied copy of the down-sampler), and the converter writes them to disk without
    building a model: all of these must start from identical weights, so they are built here
    only. The caller's random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_in = build_image_in(cfg, hidden_size)
        image_out = build_image_out(cfg, hidden_size, eps)
    return image_in, image_out
