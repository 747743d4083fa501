"""bf16 on CUDA against transformers, and FlexAttention against SDPA (what the CPU tier cannot run).

References never share our code: transformers' ``LlamaForCausalLM`` loaded from the same
safetensors, in fp32 (the reference) and in bf16 (what "bf16 error" means for the same weights),
and our SDPA path (the dense boolean mask) for the FlexAttention block mask. Errors are
max |diff| / max |ref| (``rel_err``), so the bounds do not depend on the logit scale.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import GPU_ONLY, rel_err
from tests.helpers import TINY_IMAGE, mixed_batch

pytestmark = GPU_ONLY

VOCAB = 300  # make_tiny_hf_llama's default; ids below VOCAB - 2 leave <BOI>/<EOI> out of text-only input

BF16_VS_FP32 = 2e-2
"""Largest bf16 error against the fp32 reference: bf16 has 8 mantissa bits (2^-8 = 3.9e-3 per rounding),
and two layers of matmuls, norms and softmax compound a few of them."""

FP32_VS_FP32 = 1e-4
"""fp32 against fp32 on CUDA (TF32 off): different kernels (FlexAttention vs SDPA, megatron-core vs torch
linears), the same math; summation order alone stays near 1e-6."""


def _ids(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (b, s), generator=torch.Generator().manual_seed(seed))


def _ours(path, dtype: str, backend: str = "auto"):
    from megafusion import LlamaFusion

    return LlamaFusion.from_hf_llama(
        str(path), image=TINY_IMAGE, params_dtype=dtype, device="cuda", attention_backend=backend
    ).eval()


@pytest.fixture(scope="module")
def hf_bf16(wide_hf):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(wide_hf, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()


def test_bf16_text_logits_match_transformers(wide_hf, hf_fp32, hf_bf16):
    """Our bf16 text path is as close to the fp32 Llama as transformers' own bf16 Llama is.

    100 tokens: not a multiple of FlexAttention's 128-token block, so the padded bucket is exercised.
    """
    ids = _ids(2, 100, seed=1)
    ours16, ours32 = _ours(wide_hf, "bf16"), _ours(wide_hf, "fp32")
    assert ours16.params_dtype == torch.bfloat16 and ours32.params_dtype == torch.float32
    assert next(ours16.parameters()).device.type == "cuda"
    with torch.no_grad():
        ref = hf_fp32(ids.cuda()).logits.float()
        hf16 = hf_bf16(ids.cuda()).logits
        got16 = ours16.text_logits(ids)
        got32 = ours32.text_logits(ids)
    assert got16.shape == ref.shape == (2, 100, VOCAB) and got16.device.type == "cuda"
    hf_err = rel_err(hf16, ref)  # transformers' own bf16 error on these weights
    ours_err = rel_err(got16, ref)
    assert rel_err(got32, ref) <= FP32_VS_FP32, "fp32 path differs from transformers beyond summation order"
    assert ours_err <= BF16_VS_FP32, (ours_err, hf_err)
    # "comparable to HF's own bf16 error": at most 3x it (floor 5e-3 should HF's be unusually small)
    assert ours_err <= max(3 * hf_err, 5e-3), (ours_err, hf_err)
    # two bf16 results each within e of the reference are within ~2e of each other
    assert rel_err(got16, hf16) <= max(3 * hf_err, 5e-3) + hf_err, (rel_err(got16, hf16), hf_err)
    # and bf16 is really in use (the comparison would be vacuous if both ran in fp32)
    assert ours_err > 0 and hf_err > 0


def _mixed_forward(model, batch, backward: bool = False):
    out = model(batch)
    if backward:
        model.zero_grad(set_to_none=True)
        (out.lm_loss + ((out.image_pred.float() - batch.latents.to(out.image_pred.device)) ** 2).mean()).backward()
    return out


def test_flex_matches_sdpa_in_fp32_forward_and_backward(wide_hf):
    """The FlexAttention block mask (compiled on CUDA) is the hybrid rule of the dense SDPA mask: same logits,
    same loss and predicted noise on a packed text+image batch, and the same gradients through the backward
    kernel (the training path on GPUs), to fp32 precision."""
    flex, sdpa = _ours(wide_hf, "fp32", "flex"), _ours(wide_hf, "fp32", "sdpa")
    ids = _ids(2, 100, seed=2)
    with torch.no_grad():
        assert rel_err(flex.text_logits(ids), sdpa.text_logits(ids)) <= FP32_VS_FP32
    batch = mixed_batch(VOCAB)  # 2 rows, 3 images (bidirectional blocks), 2 packed documents in row 1
    a, b = _mixed_forward(flex, batch, backward=True), _mixed_forward(sdpa, batch, backward=True)
    assert rel_err(a.lm_loss, b.lm_loss) <= FP32_VS_FP32
    assert rel_err(a.image_pred, b.image_pred) <= FP32_VS_FP32
    grads_a = {n: p.grad for n, p in flex.named_parameters() if p.requires_grad and p.grad is not None}
    grads_b = {n: p.grad for n, p in sdpa.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and any(".qkv.image." in n for n in grads_a)
    worst = max((rel_err(grads_a[n], grads_b[n]), n) for n in grads_a if grads_b[n].abs().max() > 0)
    assert worst[0] <= 1e-3, worst  # a backward sums over the sequence: a little more rounding than forward


def test_flex_matches_sdpa_in_bf16(wide_hf):
    """In bf16 the two backends agree within bf16 error, and both stay that close to the fp32 reference."""
    flex, sdpa, ref = _ours(wide_hf, "bf16", "flex"), _ours(wide_hf, "bf16", "sdpa"), _ours(wide_hf, "fp32", "sdpa")
    ids = _ids(2, 100, seed=3)
    batch = mixed_batch(VOCAB)
    with torch.no_grad():
        lf, ls, lr = flex.text_logits(ids), sdpa.text_logits(ids), ref.text_logits(ids)
        of, os_, or_ = flex(batch), sdpa(batch), ref(batch)
    assert rel_err(lf, ls) <= BF16_VS_FP32
    assert rel_err(lf, lr) <= BF16_VS_FP32 and rel_err(ls, lr) <= BF16_VS_FP32
    assert rel_err(of.lm_loss, os_.lm_loss) <= BF16_VS_FP32
    assert rel_err(of.image_pred, os_.image_pred) <= BF16_VS_FP32
    assert rel_err(of.image_pred, or_.image_pred) <= BF16_VS_FP32
    assert torch.isfinite(of.lm_loss) and torch.isfinite(of.image_pred).all()
