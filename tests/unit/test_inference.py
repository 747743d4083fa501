"""Inference: KV-cached text generation vs transformers, cached image sampling vs full recomputation."""

import pytest
import torch

from megafusion.model.batch import FusionBatch
from megafusion.model.kv_cache import KVCache
from tests.helpers import TINY_IMAGE, make_tiny_hf_llama

BOI, EOI, BOS, EOS = 297, 298, 1, 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("inf") / "hf", seed=3)


@pytest.fixture(scope="module")
def model(hf_dir):
    """A LlamaFusion whose image side differs from its init (as after training)."""
    from megafusion import LlamaFusion

    m = LlamaFusion.from_hf_llama(str(hf_dir), image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def test_greedy_text_equals_transformers_generate(model, hf_dir):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(3, 290, (3, 9), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    ours = model.generate_text(ids, max_new_tokens=16)
    assert ours.shape == ref.shape and torch.equal(ours, ref), (ours, ref)
    # stopping at EOS: use a token the first row produces as "EOS"; the other rows are padded with it like HF does
    eos = int(ref[0, 9 + 4])
    ref = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    ours = model.generate_text(ids, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(ours, ref), (ours, ref)


def test_sampling_is_seeded_and_top_p_restricts(model):
    ids = torch.randint(3, 290, (2, 5), generator=torch.Generator().manual_seed(1))
    a = model.generate_text(
        ids, 8, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    b = model.generate_text(
        ids, 8, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    c = model.generate_text(ids, 8, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, model.generate_text(ids, 8))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_cached_image_sampling_equals_full_recomputation(model, sampler):
    prompts = [[BOS, 9], [BOS, 5, 6, 7, 8]]  # unequal lengths: left padding is its own document
    kw = dict(num_steps=6, sampler=sampler)
    cached = model.generate_images(prompts, generator=torch.Generator().manual_seed(1), **kw)
    full = model.generate_images(prompts, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert cached.shape == (2, 4, 8, 8)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    if sampler == "ddim":  # deterministic after the initial noise, drawn image by image: the padded
        # first row is what that prompt gives alone (padding and batching do not leak)
        alone = model.generate_images(prompts[:1], generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(alone[0], cached[0], atol=1e-4, rtol=1e-4)
    assert (cached[0] - cached[1]).abs().max() > 1e-3  # the prompt matters


def test_guidance_scale_one_equals_unguided_and_guidance_changes_samples(model):
    prompts = [[BOS, 5, 6, 7], [BOS, 8, 9, 10, 11]]
    none = model.generate_images(prompts, num_steps=5, generator=torch.Generator().manual_seed(2))
    one = model.generate_images(prompts, num_steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(2))
    three = model.generate_images(prompts, num_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(one, none, atol=1e-4, rtol=1e-4)
    assert (three - none).abs().max() > 1e-2


def test_prefix_runs_once_per_prompt(model, monkeypatch):
    """With the cache each denoising step runs only the image tokens (+ one prefix pass)."""
    seen = []
    orig = model.run_layers

    def spy(x, state):
        seen.append(x.shape[0])
        return orig(x, state)

    monkeypatch.setattr(model, "run_layers", spy)
    model.generate_images([[BOS, 5, 6, 7, 8, 9, 10]], num_steps=4, generator=torch.Generator().manual_seed(0))
    T = TINY_IMAGE.tokens_per_image
    assert seen == [8] + [T] * 4  # prefix <s> + 6 + <BOI>, then T image tokens per step


def _greedy_by_recomputation(model, latents, steps):
    """Captions by re-running the whole sequence (no cache reuse) for every new token."""
    n = latents.shape[0]
    T = TINY_IMAGE.tokens_per_image
    toks = [[] for _ in range(n)]
    for _ in range(steps):
        ids = torch.tensor([[BOS, BOI] + [0] * T + [EOI] + t for t in toks])
        img = torch.full_like(ids, -1)
        img[:, 2 : 2 + T] = torch.arange(n)[:, None]
        batch = FusionBatch(input_ids=ids, image_ids=img, latents=latents, timesteps=torch.zeros(n, dtype=torch.long))
        logits, _ = model.forward_cached(batch, KVCache(n))
        logits[:, [BOI, EOI]] = float("-inf")
        for r, t in enumerate(logits.argmax(-1).tolist()):
            toks[r].append(t)
    return toks


def test_caption_equals_recomputation(model):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    caps = model.caption(latents, bos_token_id=BOS, max_new_tokens=6)
    assert caps == _greedy_by_recomputation(model, latents, 6)
    assert caps[0] != caps[1]  # the image matters


def test_interleaved_places_an_image_where_the_prompt_opens_one(model):
    prompt = [BOS, 5, 6, BOI]
    ids, images = model.generate_interleaved(
        prompt, max_new_tokens=5, num_steps=4, generator=torch.Generator().manual_seed(7)
    )
    assert len(images) == 1 and ids[:5] == prompt + [EOI] and len(ids) == 10 and BOI not in ids[4:]
    # the image is the one text->image sampling makes from the same caption and seed
    ref = model.generate_images([[BOS, 5, 6]], num_steps=4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(images[0], ref[0], atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named(model, hf_dir):
    from megafusion import LlamaFusion

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate_images([[BOS, 5], []])
    with pytest.raises(ValueError, match="outside"):
        model.generate_text(torch.tensor([[BOS, 10_000]]))
    with pytest.raises(ValueError, match=r"latents must be \[n, 4, 8, 8\]"):
        model.caption(torch.randn(1, 4, 16, 16), bos_token_id=BOS)
    with pytest.raises(ValueError, match="num_steps"):
        model.generate_images([[BOS]], num_steps=0)
    with pytest.raises(ValueError, match="sampler"):
        model.generate_images([[BOS]], sampler="euler")
    with pytest.raises(ValueError, match="no trained image tower"):
        LlamaFusion.from_pretrained(str(hf_dir))
