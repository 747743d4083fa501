"""Synthetic packed multimodal micro-batches in exactly the form the model consumes.

What the trainer reads when no ``data.path`` is configured (smoke runs, tests). Each row
packs documents of the form  caption <BOI> image <EOI>  (image-first with
probability 1 - data.caption_first_prob; caption dropped with probability
diffusion.caption_dropout), with per-document positions and loss only on text
tokens that predict text in the same document. Like the loader's, each batch carries its
routing plan (``FusionBatch.route_plan``), so the training forward reads no size back from the device.
"""

from __future__ import annotations

import torch

from megafusion.config.schema import Config
from megafusion.data.packing import sequence_shards
from megafusion.diffusion.objective import sample_timesteps
from megafusion.model.batch import FusionBatch
from megafusion.model.routing import RoutePlan


def synthetic_batch(
    cfg: Config, seed: int, batch_size: int | None = None, caption_len: tuple[int, int] = (4, 12)
) -> FusionBatch:
    m, img = cfg.model, cfg.model.image
    b = batch_size or cfg.data.micro_batch_size
    s = cfg.data.seq_length
    T = img.tokens_per_image
    g = torch.Generator().manual_seed(seed)
    specials = {m.boi_token_id, m.eoi_token_id}
    n_text_vocab = min(specials) if min(specials) > 16 else m.vocab_size
    ids = torch.randint(0, n_text_vocab, (b, s), generator=g)
    image_ids = torch.full((b, s), -1, dtype=torch.long)
    doc = torch.zeros(b, s, dtype=torch.long)
    pos = torch.zeros(b, s, dtype=torch.long)
    n_img = 0
    for row in range(b):
        cur, d = 0, 0
        while cur < s:
            cap = int(torch.randint(caption_len[0], caption_len[1], (1,), generator=g))
            if bool(torch.rand((), generator=g) < cfg.diffusion.caption_dropout):
                cap = 0  # caption dropped: the image is learned unconditionally (classifier-free guidance)
            need = cap + T + 2
            if cur + need > s:  # pad the tail as its own text document
                doc[row, cur:] = d
                pos[row, cur:] = torch.arange(s - cur)
                break
            caption_first = bool(torch.rand((), generator=g) < cfg.data.caption_first_prob)
            start = cur
            if caption_first:
                cur += cap
            ids[row, cur] = m.boi_token_id
            image_ids[row, cur + 1 : cur + 1 + T] = n_img
            ids[row, cur + 1 + T] = m.eoi_token_id
            cur += T + 2
            if not caption_first:
                cur += cap
            n_img += 1
            doc[row, start:cur] = d
            pos[row, start:cur] = torch.arange(cur - start)
            d += 1
    is_text = image_ids < 0
    labels = torch.roll(ids, -1, 1)
    nxt_text = torch.roll(is_text, -1, 1)
    same_doc = doc == torch.roll(doc, -1, 1)
    loss_mask = (is_text & nxt_text & same_doc & (labels != m.boi_token_id)).float()
    loss_mask[:, -1] = 0
    ls = img.latent_size
    latents = torch.randn(n_img, img.latent_channels, ls, ls, generator=g)
    timesteps = sample_timesteps(cfg.diffusion, n_img, g)
    plan = RoutePlan.build(image_ids, sequence_shards(cfg))
    return FusionBatch(ids, image_ids, pos, doc, latents, timesteps, labels, loss_mask, route_plan=plan)
