"""Cosine DDPM noise schedule (Nichol & Dhariwal 2021); epsilon or v (velocity) prediction targets."""

from __future__ import annotations

import math

import torch


class CosineSchedule:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas clipped at 0.999."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008):
        self.num_timesteps = num_timesteps
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()  # [T]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps, per image timestep t [n]."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def _a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What the model learns to predict: eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022).

        v keeps the clean image in the target at high noise, where eps ~ x_t can be copied from
        the input without reading the caption; that is what makes conditioning learnable early.
        """
        if prediction == "epsilon":
            return noise
        if prediction == "v":
            a = self._a(t, x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ValueError(f"diffusion.prediction={prediction!r} must be 'epsilon' or 'v'")
