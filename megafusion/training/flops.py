"""Training FLOPs of a step: the one count the trainer's MFU and the planner (``planning.memory``) share.

The count is analytical and knows what a frozen weight costs: a matmul
with a frozen (text) weight needs its forward (2mn per token) and its input
gradient (2mn) but no weight gradient (the third 2mn). Image-tower tokens pay
all three. Attention is counted as dense (4 s^2 h forward per layer), the LM
head only on text tokens (frozen: no weight gradient), the U-Nets by
``torch.utils.flop_counter`` on one image (x3 for forward + backward). The
Transfusion-style baseline (``model.architecture``) trains every weight: text
tokens pay all three too.
"""

from __future__ import annotations

import torch

from megafusion.config.schema import Config
from megafusion.model.image_io import build_image_in, build_image_out


def transformer_flops_per_step(cfg: Config, text_tokens: int, image_tokens: int, seqs: int) -> float:
    """Training FLOPs of the transformer and LM head for one optimizer step (whole model, all ranks)."""
    m = cfg.model
    h, d = m.hidden_size, m.head_dim
    per_token_mn = h * (m.num_attention_heads + 2 * m.num_kv_heads) * d + m.num_attention_heads * d * h
    per_token_mn += 3 * h * m.ffn_hidden_size
    text_cost = 6 if m.architecture == "transfusion" else 4  # the baseline trains the text weights too
    linear = m.num_layers * per_token_mn * (text_cost * text_tokens + 6 * image_tokens)
    s = cfg.data.seq_length
    attention = m.num_layers * seqs * 12 * s * s * h  # fwd 4 s^2 h, bwd 8 s^2 h
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
