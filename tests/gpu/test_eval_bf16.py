"""Evaluation in bf16 on CUDA: the demo's perplexity (``sequence_perplexity``) of the bf16 text path against
fp32, and the fp32 text path against transformers' fp32 Llama.

A perplexity averages per-token log-likelihoods, so bf16's ~1e-2 logit errors, of both signs, shrink
in it; 1% of the fp32 perplexity (0.01 in log space) is what a bf16 evaluation may be off by.
"""

from __future__ import annotations

import math

import torch

from tests.gpu.common import GPU_ONLY

pytestmark = GPU_ONLY

TEXTS = [
    "a red circle at the top left",
    "two small blue squares side by side, one above the other and both at the bottom right of the image",
    "green",
    "the quick brown fox jumps over the lazy dog " * 2,
]


class CharTokenizer:
    """The part of a HF tokenizer ``sequence_perplexity`` calls: bos/eos ids and ``__call__`` -> input_ids."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [3 + ord(c) % 290 for c in text]}  # ids in [3, 293): no <BOI>/<EOI> (298, 299)


def test_bf16_perplexity_close_to_fp32(wide_hf, hf_fp32):
    from megafusion import LlamaFusion
    from megafusion.demo.base_lm import sequence_perplexity
    from tests.helpers import TINY_IMAGE

    tok = CharTokenizer()
    m16 = LlamaFusion.from_hf_llama(str(wide_hf), image=TINY_IMAGE, params_dtype="bf16", device="cuda").eval()
    m32 = LlamaFusion.from_hf_llama(str(wide_hf), image=TINY_IMAGE, params_dtype="fp32", device="cuda").eval()
    with torch.no_grad():
        p16 = sequence_perplexity(m16.text_logits, tok, TEXTS)
        p32 = sequence_perplexity(m32.text_logits, tok, TEXTS)
        ref = sequence_perplexity(lambda ids: hf_fp32(ids.cuda()).logits, tok, TEXTS)
    assert all(math.isfinite(p) and p > 1 for p in (p16, p32, ref)), (p16, p32, ref)
    assert abs(math.log(p32) - math.log(ref)) <= 1e-5, (p32, ref)  # fp32 vs fp32: the same model
    assert abs(math.log(p16) - math.log(p32)) <= 1e-2, (p16, p32)
