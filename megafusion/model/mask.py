"""The LlamaFusion attention mask, as a dense boolean tensor and as a FlexAttention mask_mod.

Rule (True = may attend), for query i and key j of one packed sequence:
    same document  AND  (j <= i  OR  i and j are tokens of the same image)
Text is causal; every token of an image sees the whole image (bidirectional);
nothing attends across packed-document boundaries. The diagonal is always
allowed, so no row is empty (padding is just one more document).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def hybrid_attention_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor,
    query_offset: int = 0,
) -> torch.Tensor:
    """Boolean mask [b, 1, q, k] for SDPA.

    document_ids, image_ids: [b, k] per key token (image_ids = -1 for text).
    Queries are the last ``k - query_offset`` tokens (``query_offset`` > 0 when
    keys include a cached prefix).
    """
    b, k = document_ids.shape
    q_doc = document_ids[:, query_offset:]
    q_img = image_ids[:, query_offset:]
    q_pos = torch.arange(query_offset, k, device=document_ids.device)
    k_pos = torch.arange(k, device=document_ids.device)
    same_doc = q_doc[:, :, None] == document_ids[:, None, :]  # [b, q, k]
    causal = (q_pos[:, None] >= k_pos[None, :])[None]  # [1, q, k]
    same_image = (q_img[:, :, None] == image_ids[:, None, :]) & (q_img[:, :, None] >= 0)
    return (same_doc & (causal | same_image)).unsqueeze(1)


def hybrid_mask_mod(document_ids: torch.Tensor, image_ids: torch.Tensor) -> Callable:
    """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_ids[b, q_idx] == document_ids[b, kv_idx]
        q_img = image_ids[b, q_idx]
        same_image = (q_img == image_ids[b, kv_idx]) & (q_img >= 0)
        return same_doc & ((q_idx >= kv_idx) | same_image)

    return mask_mod
