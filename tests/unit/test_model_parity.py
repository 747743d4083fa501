"""One-process LlamaFusion against transformers' LlamaForCausalLM and against itself.

References do not share our code: HF's own Llama (weights from the same
safetensors directory) and HF's own attention with our mask passed as a 4D mask.
"""

import pytest
import torch

from megafusion import FusionBatch, LlamaFusion
from megafusion.model.mask import hybrid_attention_mask
from tests.helpers import TINY_IMAGE, mixed_batch


def _hf(path, impl="sdpa"):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tiny_hf):
    return LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)


def test_text_logits_equal_transformers(model, tiny_hf):
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _hf(tiny_hf)(ids).logits
        got = model.text_logits(ids)
    assert got.shape == (3, 40, 300)
    assert (got - ref).abs().max().item() <= 1e-4


def test_tied_embeddings_checkpoint(tiny_hf_tied):
    m = LlamaFusion.from_hf_llama(str(tiny_hf_tied), image=TINY_IMAGE)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _hf(tiny_hf_tied)(ids).logits
        got = m.text_logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_lm_loss_equals_torch_cross_entropy(model, tiny_hf):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    mask = torch.ones(2, 24)
    mask[:, -1] = 0
    out = model(FusionBatch(ids, torch.full_like(ids, -1), labels=labels, loss_mask=mask))
    with torch.no_grad():
        logits = _hf(tiny_hf)(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-5, rtol=1e-5)
    assert out.lm_tokens.item() == 2 * 23


def test_routing_and_copy_exact_against_dense_llama(tiny_hf):
    """Image tower = copy of the text tower: routed model == dense HF Llama with the same hybrid mask."""
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    hf = _hf(tiny_hf)
    b = mixed_batch(300)
    emb = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = m.final_norm(m.forward_embeddings(emb, b.image_ids, b.position_ids, b.document_ids))
        mask = hybrid_attention_mask(b.document_ids, b.image_ids)
        ref = hf.model(inputs_embeds=emb, attention_mask=mask, position_ids=b.position_ids).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and the mask is not a no-op: plain causal attention gives different image-token states
    with torch.no_grad():
        causal = hf.model(inputs_embeds=emb, position_ids=b.position_ids).last_hidden_state
    assert (causal - ref).abs().max() > 1e-3


def test_image_tower_changes_never_touch_text_outputs(tiny_hf):
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    ids = torch.randint(0, 298, (2, 33), generator=torch.Generator().manual_seed(5))  # no <BOI>/<EOI>
    with torch.no_grad():
        before = m.text_logits(ids)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        after = m.text_logits(ids)
    assert torch.equal(before, after)


def test_text_tower_gets_no_gradient_image_side_does(tiny_hf):
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    b = mixed_batch(300)
    out = m(b)
    (out.lm_loss + ((out.image_pred - b.latents) ** 2).mean()).backward()
    frozen = [(n, p) for n, p in m.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert frozen and trainable
    assert all(p.grad is None for _, p in frozen)
    names = {n for n, _ in frozen}
    assert "embedding.weight" in names and "lm_head.weight" in names and "layers.0.qkv.text.weight" in names
    assert "layers.0.qkv.norm.text" in names and "final_norm.weight" in names
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    # <EOI>/<BOI> rows are unused in this batch, so their embedding has zero grad; everything else learns
    assert missing == ["special_embedding"], missing


def test_linear_patchifier_option(tiny_hf):
    from dataclasses import replace

    img = replace(TINY_IMAGE, io="linear")
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=img)
    b = mixed_batch(300, image=img)
    out = m(b)
    assert out.image_pred.shape == b.latents.shape
    out.image_pred.sum().backward()
    assert m.image_in.proj.weight.grad is not None


@pytest.mark.parametrize("io", ["unet", "linear"])
def test_sincos_position_embedding_adds_row_and_column(tiny_hf, io):
    """position_embedding=sincos adds a fixed table of row/column codes; weights and checkpoints stay the same."""
    import math
    from dataclasses import replace

    plain = replace(TINY_IMAGE, io=io)
    img = replace(plain, position_embedding="sincos")
    torch.manual_seed(0)
    a = LlamaFusion.from_hf_llama(str(tiny_hf), image=plain)
    torch.manual_seed(0)
    b = LlamaFusion.from_hf_llama(str(tiny_hf), image=img)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    lat, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        diff = b.image_in(lat, t)[0] - a.image_in(lat, t)[0]  # [2, 16, hidden]
    side, h = img.tokens_per_side, diff.shape[-1]
    assert torch.allclose(diff[0], diff[1], atol=1e-5)  # the same for every image and timestep
    table = diff[0].view(side, side, h)  # raster order: [row, column, hidden]
    q = h // 4
    # independent reference: row r -> sin/cos(r * 10000^(-k/q)) in the first half, column c in the second
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        w = [10000.0 ** (-k / q) for k in range(q)]
        ref = [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w]
        ref += [math.sin(c * x) for x in w] + [math.cos(c * x) for x in w]
        assert torch.allclose(table[r, c], torch.tensor(ref), atol=1e-4)
    assert torch.allclose(table[0, 1, : h // 2], table[0, 2, : h // 2], atol=1e-5)  # same row, same first half
    assert not torch.allclose(table[0, 1, h // 2 :], table[0, 2, h // 2 :])  # columns told apart


def test_special_tokens_use_trainable_rows(tiny_hf):
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    boi, eoi = m.cfg.boi_token_id, m.cfg.eoi_token_id
    assert (boi, eoi) == (298, 299)
    ids = torch.tensor([[1, 2, boi, 3, eoi, 4]])
    b = FusionBatch(ids, torch.full_like(ids, -1), labels=ids, loss_mask=torch.ones(1, 6))
    m(b).lm_loss.backward()
    assert m.special_embedding.grad[0].abs().sum() > 0 and m.special_embedding.grad[1].abs().sum() > 0


def test_bad_batches_are_named(model):
    b = mixed_batch(300)
    b.timesteps = b.timesteps[:2]
    with pytest.raises(ValueError, match="FusionBatch.timesteps"):
        model(b)
    b = mixed_batch(300)
    b.latents = torch.randn(3, 4, 16, 16)
    with pytest.raises(ValueError, match="per-image shape"):
        model(b)
    b = mixed_batch(300)
    b.image_ids[0, 5] = -1
    with pytest.raises(ValueError, match="exactly 16 tokens"):
        model(b)
    with pytest.raises(ValueError, match="empty"):
        model.text_logits(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in"):
        model.text_logits(torch.tensor([[5, 300]]))


def test_activation_checkpointing_gives_same_gradients(tiny_hf):
    grads = []
    for ckpt in (False, True):
        m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
        m.activation_checkpointing = ckpt
        b = mixed_batch(300)
        out = m(b)
        (out.lm_loss + out.image_pred.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_each_token_uses_its_own_tower(tiny_hf):
    """Perturbing the image tower changes image positions and later text, never text before the first image."""
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    b = mixed_batch(300)
    emb = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = m.forward_embeddings(emb, b.image_ids, b.position_ids, b.document_ids)
        for mod in m.routed_modules():
            mod.image.weight.mul_(1.5)
        after = m.forward_embeddings(emb, b.image_ids, b.position_ids, b.document_ids)
    assert torch.equal(before[0, :5], after[0, :5])  # row 0: text before its image at 5
    assert torch.equal(before[1, :2], after[1, :2])  # row 1: text before its image at 2
    assert (before[0, 5:21] - after[0, 5:21]).abs().min() > 0  # every image token changed
    assert (before[1, 21:26] - after[1, 21:26]).abs().max() > 0  # text after an image sees it


def test_image_predictions_follow_their_own_image(tiny_hf):
    """Changing the last image's latents changes its prediction only (earlier images, other rows untouched)."""
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    b = mixed_batch(300)
    with torch.no_grad():
        p1 = m(b).image_pred
        b.latents[2] += 1.0
        p2 = m(b).image_pred
    assert torch.equal(p1[0], p2[0]) and torch.equal(p1[1], p2[1])
    assert (p1[2] - p2[2]).abs().max() > 1e-3
