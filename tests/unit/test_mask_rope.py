"""The hybrid mask against a brute-force reference; FlexAttention's mask_mod against the dense mask;
RoPE tables against transformers' LlamaRotaryEmbedding."""

import torch

from megafusion.config.schema import RopeScalingConfig
from megafusion.model.mask import hybrid_attention_mask, hybrid_mask_mod
from megafusion.model.rope import rope_cos_sin, rope_inv_freq


def _brute(doc, img):
    b, s = doc.shape
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for bb in range(b):
        for i in range(s):
            for j in range(s):
                if doc[bb, i] != doc[bb, j]:
                    continue
                causal = j <= i
                same_img = img[bb, i] >= 0 and img[bb, i] == img[bb, j]
                out[bb, 0, i, j] = causal or same_img
    return out


def _example():
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0] * 12])
    img = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, -1, 2, 2], [-1, -1, 3, 3, 3, 3, -1, 4, 4, -1, -1, -1]])
    return doc, img


def test_mask_matches_bruteforce_and_examples():
    doc, img = _example()
    m = hybrid_attention_mask(doc, img)
    assert torch.equal(m, _brute(doc, img))
    assert m[0, 0, 1, 3] and not m[0, 0, 0, 1]  # image bidirectional; text before image can't see it
    assert not m[0, 0, 6, 2]  # no attention across documents
    assert m[1, 0, 9, 4] and not m[1, 0, 4, 7]  # text after an image sees it; image can't see a later one
    assert m.diagonal(dim1=-2, dim2=-1).all()


def test_mask_with_query_offset_is_bottom_rows():
    doc, img = _example()
    full = hybrid_attention_mask(doc, img)
    assert torch.equal(hybrid_attention_mask(doc, img, query_offset=7), full[:, :, 7:])


def test_flex_mask_mod_equals_dense():
    doc, img = _example()
    mod = hybrid_mask_mod(doc, img)
    b, s = doc.shape
    q = torch.arange(s)[:, None].expand(s, s)
    kv = torch.arange(s)[None, :].expand(s, s)
    for bb in range(b):
        got = mod(torch.tensor(bb), torch.tensor(0), q, kv)
        assert torch.equal(got, hybrid_attention_mask(doc, img)[bb, 0])


def test_flex_attention_backend_matches_sdpa():
    from megafusion.model.attention_core import AttentionMask, shared_attention

    torch.manual_seed(0)
    doc = torch.zeros(1, 128, dtype=torch.long)
    doc[0, 70:] = 1
    img = torch.full((1, 128), -1)
    img[0, 10:42] = 0
    img[0, 80:112] = 1
    q = torch.randn(1, 4, 128, 16)
    k, v = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    ref = shared_attention(q, k, v, AttentionMask.build(doc, img, "sdpa"))
    got = shared_attention(q, k, v, AttentionMask.build(doc, img, "flex"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope, max_position_embeddings=4096)
    hf = LlamaRotaryEmbedding(hf_cfg)
    ours = rope_inv_freq(64, 500000.0, RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 64))
    torch.testing.assert_close(ours, hf.inv_freq, atol=0, rtol=0)
    pos = torch.tensor([[0, 5, 100, 3000]])
    cos_hf, sin_hf = hf(torch.zeros(1, 4, 256), pos)
    cos, sin = rope_cos_sin(pos, ours, torch.float32)
    torch.testing.assert_close(cos, cos_hf)
    torch.testing.assert_close(sin, sin_hf)
    # the scaling matters: unscaled frequencies differ
    assert not torch.allclose(rope_inv_freq(64, 500000.0, RopeScalingConfig()), ours)
