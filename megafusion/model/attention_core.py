"""The shared softmax: one attention over all tokens of a sequence, whatever tower made their Q/K/V.

Two backends behind one function:
  * PyTorch SDPA with the dense boolean hybrid mask (CPU, and GPU fallback);
  * FlexAttention with the same rule as a block-sparse ``mask_mod`` (CUDA), which
    skips fully masked blocks (other documents, the future) instead of
    materialising an s x s mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megafusion.model.mask import hybrid_attention_mask, hybrid_mask_mod

_compiled_flex = None


def _flex_attention():
    """torch.compile'd flex_attention on CUDA (eager flex is a slow reference elsewhere)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


@dataclass
class AttentionMask:
    """Per-forward mask state, built once and shared by all layers."""

    backend: str  # "sdpa" or "flex"
    dense: torch.Tensor | None = None  # [b, 1, q, k] bool (sdpa)
    block_mask: Any = None  # FlexAttention BlockMask (flex)

    @staticmethod
    def build(document_ids: torch.Tensor, image_ids: torch.Tensor, backend: str) -> AttentionMask:
        if backend == "auto":
            backend = "flex" if document_ids.is_cuda else "sdpa"
        if backend == "sdpa":
            return AttentionMask("sdpa", dense=hybrid_attention_mask(document_ids, image_ids))
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            b, s = document_ids.shape
            block = create_block_mask(
                hybrid_mask_mod(document_ids, image_ids),
                B=b,
                H=None,
                Q_LEN=s,
                KV_LEN=s,
                device=document_ids.device,
                _compile=document_ids.is_cuda,
            )
            return AttentionMask("flex", block_mask=block)
        raise ValueError(f"model.attention_backend={backend!r} must be auto, sdpa or flex")


def shared_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float | None = None
) -> torch.Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] (GQA: hq % hkv == 0) -> [b, hq, s, d]."""
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)
    return _flex_attention()(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
