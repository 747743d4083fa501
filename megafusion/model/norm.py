"""RMSNorm math (Llama's), with apex's fused kernel used when present on CUDA."""

from __future__ import annotations

import torch

try:  # optional: NVIDIA apex fused RMSNorm (GPU clusters build it; see README)
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # pragma: no cover - apex is absent on CPU machines
    _apex_rms_norm = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in float32, cast back, then scale (HF's exact order)."""
    if _apex_rms_norm is not None and x.is_cuda:
        return _apex_rms_norm(x, weight, weight.shape, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class RMSNorm(torch.nn.Module):
    """A single-tower RMSNorm (final norm, image-output norm)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
