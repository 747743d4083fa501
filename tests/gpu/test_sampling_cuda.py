"""KV-cached generation on CUDA: the cache (dense-mask SDPA over cached keys) against full recomputation
(``text_logits``: FlexAttention on CUDA), image sampling and captioning on the CUDA kernels.

fp32: the comparison is of which token wins, and bf16 rounding would turn near-ties into noise.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import GPU_ONLY
from tests.helpers import TINY_IMAGE

pytestmark = GPU_ONLY

BOS, EOS = 1, 2
VOCAB = 300  # tests/conftest.py tiny_hf
TIE = 1e-4
"""A recomputed logit this close to the maximum counts as a tie: fp32 logits from two kernel paths differ by
~1e-6, so a token chosen by the cache may lose to a co-maximal one by that much and still be greedy."""


@pytest.fixture(scope="module")
def model(tiny_hf):
    from megafusion import LlamaFusion

    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE, params_dtype="fp32", device="cuda").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking image side: the copied tower alone would make images trivial
        for p in m.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device))
    return m


def test_greedy_cached_equals_full_recomputation(model):
    ids = torch.randint(3, VOCAB - 2, (3, 11), generator=torch.Generator().manual_seed(1))
    new = 8
    with torch.no_grad():
        out = model.generate_text(ids, max_new_tokens=new)
        assert out.shape == (3, 11 + new) and out.device.type == "cuda"
        assert torch.equal(out[:, :11].cpu(), ids)
        seq = ids.cuda()
        for t in range(new):  # greedy by recomputing the whole growing sequence at every token
            logits = model.text_logits(seq)[:, -1]  # [b, V]
            chosen = out[:, 11 + t]
            best = logits.argmax(-1)
            gap = logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]
            assert bool(((chosen == best) | (gap <= TIE)).all()), (t, chosen.tolist(), best.tolist(), gap.tolist())
            seq = torch.cat([seq, chosen[:, None]], 1)  # follow the cached sequence: one near-tie cannot cascade


def test_generate_images_with_a_seeded_cpu_generator(model):
    img = TINY_IMAGE
    shape = (img.latent_channels, img.latent_size, img.latent_size)
    one = model.generate_images([[BOS, 5, 6, 7, 8]], num_steps=4, generator=torch.Generator().manual_seed(3))
    assert one.shape == (1, *shape) and one.dtype == torch.float32 and torch.isfinite(one).all()
    # classifier-free guidance with prompts of unequal length (left padding) through the cached prefix
    two = model.generate_images(
        [[BOS, 5, 6, 7, 8], [BOS, 9]], num_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(4)
    )
    assert two.shape == (2, *shape) and torch.isfinite(two).all()
    assert not torch.equal(two[0], two[1])


def test_caption_runs(model):
    latents = torch.randn(
        2,
        TINY_IMAGE.latent_channels,
        TINY_IMAGE.latent_size,
        TINY_IMAGE.latent_size,
        generator=torch.Generator().manual_seed(5),
    )
    caps = model.caption(latents, bos_token_id=BOS, eos_token_id=EOS, max_new_tokens=6)
    assert len(caps) == 2
    for cap in caps:
        assert len(cap) <= 6 and all(0 <= t < VOCAB for t in cap)
        assert model.cfg.boi_token_id not in cap and model.cfg.eoi_token_id not in cap and EOS not in cap
