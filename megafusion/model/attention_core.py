"""The shared softmax: one attention over all tokens of a sequence, whatever tower made their Q/K/V.

Two backends behind one function:
  * PyTorch SDPA with the dense boolean hybrid mask (CPU, and GPU fallback);
  * FlexAttention with the same rule as a block-sparse ``mask_mod`` (CUDA), which
    skips fully masked blocks (other documents, the future) instead of
    materialising an s x s mask.

FlexAttention is compiled with static shapes (the fastest kernels), so every new
sequence length would compile again: text_logits, perplexity and uncached sampling
see a new length per prompt. Flex forwards are therefore padded to a length bucket
(:func:`flex_bucket`: powers of two from one 128-token block up) and the padding is
masked out, so a run over many lengths compiles once per bucket. Training (grad
enabled) runs its one ``data.seq_length`` unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megafusion.model.mask import hybrid_attention_mask, hybrid_mask_mod

_compiled_flex = None

FLEX_BLOCK = 128  # FlexAttention's default block size: the smallest bucket


def flex_bucket(seq_len: int) -> int:
    """The padded length a flex forward of ``seq_len`` tokens runs at: the next power of two, >= 128.

    Powers of two bound the compiles to log2 of the longest length (one for everything up
    to 128 tokens), and padding costs little: each padding token is its own document, so
    it attends only to itself and FlexAttention skips every block of padding against real
    tokens; only the diagonal blocks of the padding are computed.
    """
    return max(FLEX_BLOCK, 1 << (seq_len - 1).bit_length())


def _flex_attention():
    """torch.compile'd flex_attention on CUDA (eager flex is a slow reference elsewhere).

    ``dynamic=False``: shapes are bucketed (:func:`flex_bucket`), so static kernels
    compile once per bucket rather than once per length.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


def _pad_ids(document_ids: torch.Tensor, image_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, s] ids -> [b, length]: each padding token a document of its own (below every real id), text.

    A document of its own makes a padding query attend only to itself (the diagonal is
    always allowed, so no row is empty) and no real query attend to padding.
    """
    b, s = document_ids.shape
    if length == s:
        return document_ids, image_ids
    below = document_ids.amin(1, keepdim=True) - 1  # [b, 1], on device: no host sync
    pad_doc = below - torch.arange(length - s, device=document_ids.device)  # [b, pad], all distinct
    pad_img = torch.full((b, length - s), -1, dtype=image_ids.dtype, device=image_ids.device)
    return torch.cat([document_ids, pad_doc.to(document_ids.dtype)], 1), torch.cat([image_ids, pad_img], 1)


@dataclass
class AttentionMask:
    """Per-forward mask state, built once and shared by all layers."""

    backend: str  # "sdpa" or "flex"
    dense: torch.Tensor | None = None  # [b, 1, q, k] bool (sdpa)
    block_mask: Any = None  # FlexAttention BlockMask (flex), over flex_len tokens
    flex_len: int = 0  # the bucketed length q/k/v are padded to (flex)

    @staticmethod
    def build(document_ids: torch.Tensor, image_ids: torch.Tensor, backend: str) -> AttentionMask:
        if backend == "auto":
            backend = "flex" if document_ids.is_cuda else "sdpa"
        if backend == "sdpa":
            return AttentionMask("sdpa", dense=hybrid_attention_mask(document_ids, image_ids))
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            b, s = document_ids.shape
            # training runs one length (data.seq_length): no padding there; evaluation and sampling
            # (no grad) see a new length per prompt and pay one compile per bucket instead
            length = s if torch.is_grad_enabled() else flex_bucket(s)
            doc, img = _pad_ids(document_ids, image_ids, length)  # [b, length]
            block = create_block_mask(
                hybrid_mask_mod(doc, img),
                B=b,
                H=None,
                Q_LEN=length,
                KV_LEN=length,
                device=document_ids.device,
                _compile=document_ids.is_cuda,
            )
            return AttentionMask("flex", block_mask=block, flex_len=length)
        raise ValueError(f"model.attention_backend={backend!r} must be auto, sdpa or flex")


def shared_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float | None = None
) -> torch.Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] (GQA: hq % hkv == 0) -> [b, hq, s, d].

    Flex: q/k/v are zero-padded to the mask's bucketed length (the mask keeps padding
    and real tokens apart) and the padded rows dropped from the output.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)
    s = q.shape[2]
    pad = (mask.flex_len or s) - s  # (a BlockMask built elsewhere, without flex_len: as given)
    if pad < 0 or k.shape[2] != s:
        raise ValueError(f"flex attention mask covers {mask.flex_len} tokens, got q {s} and k {k.shape[2]}")
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # [b, h, flex_len, d]
    out = _flex_attention()(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, :s] if pad else out  # [b, hq, s, d]
