"""Training FLOPs of a step: the one count the trainer's MFU and the planner (``planning.memory``) share.

The count is analytical and knows what a frozen weight costs: a matmul
with a frozen (text) weight needs its forward (2mn per token) and its input
gradient (2mn) but no weight gradient (the third 2mn). Image-tower tokens pay
all three. Attention is counted over the (query, key) pairs the hybrid mask
allows (``attention_pairs``: causal within each packed document, plus the
upper triangle of every image), 4 h FLOPs per pair forward and 8 h backward,
not as dense s^2 per row (which overstates a packed batch of short documents
several-fold); the LM head only on text tokens (frozen: no weight gradient), the U-Nets by
``torch.utils.flop_counter`` on one image (x3 for forward + backward). The
Transfusion-style baseline (``model.architecture``) trains every weight: text
tokens pay all three too.
"""

from __future__ import annotations

import torch

from megafusion.config.schema import Config
from megafusion.model.image_io import build_image_in, build_image_out


def attention_pairs(document_ids: torch.Tensor | None, image_ids: torch.Tensor) -> int:
    """(query, key) pairs of a packed batch [b, s] that the hybrid mask allows (``model/mask.py``'s rule).

    Documents and images are contiguous runs in a packed row, so the count is closed-form: L(L+1)/2
    per document of L tokens (causal, diagonal included) plus T(T-1)/2 per image of T tokens (its
    keys after each query, which bidirectional attention adds). No s x s mask is built.
    """
    if document_ids is None:  # one document per row
        document_ids = torch.zeros_like(image_ids)
    total = 0
    for doc, img in zip(document_ids.cpu(), image_ids.cpu()):
        _, lengths = torch.unique_consecutive(doc, return_counts=True)
        total += int((lengths * (lengths + 1) // 2).sum())
        tokens = img[img >= 0]
        if tokens.numel():
            _, sizes = torch.unique_consecutive(tokens, return_counts=True)
            total += int((sizes * (sizes - 1) // 2).sum())
    return total


def planned_attention_pairs(cfg: Config, seqs: int, image_fraction: float) -> float:
    """The planner's estimate of ``attention_pairs``: each row one document (an upper bound for packed rows)
    with its share of images."""
    s, t = cfg.data.seq_length, cfg.model.image.tokens_per_image
    images_per_row = s * image_fraction / t
    return seqs * (s * (s + 1) / 2 + images_per_row * t * (t - 1) / 2)


def transformer_flops_per_step(
    cfg: Config, text_tokens: int, image_tokens: int, seqs: int, pairs: float | None = None
) -> float:
    """Training FLOPs of the transformer and LM head for one optimizer step (whole model, all ranks).

    ``pairs``: attention (query, key) pairs the mask allows over the step's sequences
    (``attention_pairs``); None counts every row as dense (s^2 pairs), an upper bound.
    """
    m = cfg.model
    h, d = m.hidden_size, m.head_dim
    per_token_mn = h * (m.num_attention_heads + 2 * m.num_kv_heads) * d + m.num_attention_heads * d * h
    per_token_mn += 3 * h * m.ffn_hidden_size
    text_cost = 6 if m.architecture == "transfusion" else 4  # the baseline trains the text weights too
    linear = m.num_layers * per_token_mn * (text_cost * text_tokens + 6 * image_tokens)
    s = cfg.data.seq_length
    pairs = seqs * s * s if pairs is None else pairs
    attention = m.num_layers * 12 * pairs * h  # per allowed pair: fwd 4 h (QK^T and AV), bwd 8 h
    head = text_cost * text_tokens * h * m.vocab_size
    return float(linear + attention + head)


def image_io_flops_per_image(cfg: Config) -> float:
    """Forward+backward FLOPs of U-Net down + up (or the patchifiers) for one image.

    Measured with torch's flop counter on freshly built modules of the configured
    size, so every rank knows it whatever stage it holds.
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = cfg.model
    img = m.image
    enc, dec = build_image_in(img, m.hidden_size), build_image_out(img, m.hidden_size, m.rms_norm_eps)
    lat = torch.zeros(1, img.latent_channels, img.latent_size, img.latent_size)
    t = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tokens, skips = enc(lat, t)
        dec(tokens, t, skips)
    return 3.0 * fc.get_total_flops()
