"""LLaVA-Fusion in one process against transformers' LlavaForConditionalGeneration.

The reference is transformers' own LLaVA (CLIP vision tower, projector, Llama), loaded from the
same safetensors directory; megafusion's vision path and text tower are its own code.
"""

import json
import shutil

import pytest
import torch

from megafusion import FusionBatch, LlamaFusion
from megafusion.checkpoint.hf_import import HFCheckpointError
from tests.helpers import LLAVA_IMAGE_TOKEN, TINY_IMAGE, make_tiny_hf_llava, mixed_batch

BOI, EOI = 297, 298
P = 16  # features per picture: (28 / 7) ** 2, CLS dropped


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_tiny_hf_llava(tmp_path_factory.mktemp("llava") / "tiny_llava")


def _fusion(path):
    return LlamaFusion.from_hf_llama(str(path), image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI).eval()


def _hf(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def understanding_inputs(seed=0, b=2, s=40, starts=(3, 10)):
    """Rows of text with one picture's placeholders each (at ``starts``), and the pictures."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (b, s), generator=g)
    for row, a in enumerate(starts[:b]):
        ids[row, a : a + P] = LLAVA_IMAGE_TOKEN
    return ids, torch.randn(b, 3, 28, 28, generator=g)


def test_understanding_logits_equal_transformers(llava_dir):
    ids, pix = understanding_inputs()
    model, ref = _fusion(llava_dir), _hf(llava_dir)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pix).logits
        got = model.text_logits(ids, pixel_values=pix)
        other = model.text_logits(ids, pixel_values=pix.flip(-1))
    assert got.shape == want.shape == (2, 40, 300)
    assert (got - want).abs().max().item() <= 1e-4
    # the pictures matter: another picture changes the logits from its placeholders on, and none before
    assert torch.equal(other[0, :3], got[0, :3])
    assert (other[0, 3:] - got[0, 3:]).abs().max() > 1e-3


def test_greedy_captions_equal_transformers_generate(llava_dir):
    ids, pix = understanding_inputs(seed=1, s=24, starts=(1, 6))
    model, ref = _fusion(llava_dir), _hf(llava_dir)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pix, max_new_tokens=12, do_sample=False)
    got = model.generate_text(ids, max_new_tokens=12, pixel_values=pix)
    assert got.tolist() == want.tolist()


def test_transformers_v5_tensor_names_load_the_same(llava_dir, tmp_path):
    """A directory saved with the v5 in-memory names (model.language_model.*, model.vision_tower.*)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "v5"
    shutil.copytree(llava_dir, out)
    rename = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    tensors = {}
    for k, v in load_file(str(llava_dir / "model.safetensors")).items():
        new = next((to + k[len(fr) :] for fr, to in rename.items() if k.startswith(fr)), k)
        tensors[new] = v
    assert not any(k.startswith("language_model.") for k in tensors)
    save_file(tensors, str(out / "model.safetensors"))
    ids, pix = understanding_inputs(seed=2)
    with torch.no_grad():
        a = _fusion(llava_dir).text_logits(ids, pixel_values=pix)
        b = _fusion(out).text_logits(ids, pixel_values=pix)
    assert torch.equal(a, b)


def test_training_leaves_understanding_bit_identical(llava_dir):
    """Steps on generation images and VLM understanding pairs: the VLM's logits do not move, the image tower does."""
    model = _fusion(llava_dir).train()
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(("vision.", "embedding.")))
    u_ids, u_pix = understanding_inputs(seed=3)
    with torch.no_grad():
        before = model.text_logits(u_ids, pixel_values=u_pix)
    image_q = model.layers["0"].qkv.image.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = mixed_batch(300, image=TINY_IMAGE, seed=4)
    for _ in range(3):
        und = FusionBatch.text_only(u_ids, labels=torch.roll(u_ids, -1, 1))
        und.pixel_values = u_pix
        out = model(gen)
        loss = out.lm_loss + out.image_pred.square().mean() + model(und).lm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        after = model.eval().text_logits(u_ids, pixel_values=u_pix)
    assert torch.equal(before, after)
    assert (model.layers["0"].qkv.image.weight - image_q).abs().max() > 1e-4
    assert _hf(llava_dir) is not None  # the source directory is untouched and still loads


def test_unsupported_vision_tower_is_named(tmp_path):
    path = make_tiny_hf_llava(tmp_path / "siglip", vision_type="siglip_vision_model")
    with pytest.raises(HFCheckpointError, match=r"vision_config.model_type='siglip_vision_model'"):
        _fusion(path)


def test_other_vlm_types_and_pickle_weights_are_refused(llava_dir, tmp_path):
    nxt = tmp_path / "next"
    shutil.copytree(llava_dir, nxt)
    cfg = json.loads((nxt / "config.json").read_text())
    cfg["model_type"] = "llava_next"
    (nxt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match=r"model_type='llava_next' is not supported"):
        _fusion(nxt)
    pkl = tmp_path / "pickle"
    pkl.mkdir()
    shutil.copy(llava_dir / "config.json", pkl / "config.json")
    (pkl / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(HFCheckpointError, match=r"pickle \(\*\.bin\) weights"):
        _fusion(pkl)


def test_placeholder_count_and_missing_tower_are_errors(llava_dir, tiny_hf, tmp_path):
    ids, pix = understanding_inputs(seed=5)
    with pytest.raises(ValueError, match="32 <image> placeholders .* 1 pictures x 16 features"):
        _fusion(llava_dir).text_logits(ids, pixel_values=pix[:1])
    with pytest.raises(ValueError, match="has no vision tower"):
        LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE).text_logits(ids, pixel_values=pix)
    from safetensors.torch import load_file, save_file

    cut = tmp_path / "cut"
    shutil.copytree(llava_dir, cut)
    tensors = load_file(str(cut / "model.safetensors"))
    del tensors["multi_modal_projector.linear_2.bias"]
    save_file(tensors, str(cut / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match="projector.linear_2.bias tensor is missing"):
        _fusion(cut)


def test_hub_config_with_default_keys_left_out():
    """llava-hf/llava-1.5-7b-hf's config.json lists only non-default keys: read as transformers reads it."""
    from transformers import LlavaConfig

    from megafusion.checkpoint.hf_import import model_config_from_hf, vision_spec_from_hf

    hub = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    ref = LlavaConfig(**{k: v for k, v in hub.items() if k not in ("architectures", "model_type")})
    m, v = model_config_from_hf(hub), vision_spec_from_hf(hub)
    t = ref.text_config
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads, m.ffn_hidden_size) == (
        t.vocab_size,
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
    )
    assert m.rms_norm_eps == t.rms_norm_eps and m.max_position_embeddings == 4096
    vc = ref.vision_config
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size, v.hidden_act) == (
        vc.hidden_size,
        vc.num_hidden_layers,
        vc.num_attention_heads,
        vc.image_size,
        vc.patch_size,
        vc.hidden_act,
    )
    assert v.image_token_id == ref.image_token_id == 32000
    assert v.tokens_per_image == 576 and v.layers_needed == 23
    assert (m.boi_token_id, m.eoi_token_id) == (32062, 32063)


def test_caption_with_pixels_equals_transformers_generate(llava_dir):
    """``caption(pixel_values=...)``: the VLM's prompt <s> <image> x 16 prompt, decoded until EOS (id 2)."""
    model, ref = _fusion(llava_dir), _hf(llava_dir)
    pix = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    prompt = [11, 12, 13]
    ids = torch.tensor([[1, *[LLAVA_IMAGE_TOKEN] * P, *prompt]] * 3)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pix, max_new_tokens=10, do_sample=False, eos_token_id=None)
    got = model.caption(None, 1, pixel_values=pix, prompt_ids=prompt, max_new_tokens=10)
    assert got == want[:, ids.shape[1] :].tolist()
    with pytest.raises(ValueError, match="latents .* or pixel_values"):
        model.caption(torch.zeros(3, 4, 8, 8), 1, pixel_values=pix)


def test_hub_tensor_layout_loads_the_same(llava_dir, tmp_path):
    """The hub's v4 names: vision_tower.vision_model.* (transformers 5 saves vision_tower.* itself)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "hub"
    shutil.copytree(llava_dir, out)
    tensors = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :] if k.startswith("vision_tower.") else k): v
        for k, v in load_file(str(llava_dir / "model.safetensors")).items()
    }
    assert any(k.startswith("vision_tower.vision_model.embeddings.") for k in tensors)
    save_file(tensors, str(out / "model.safetensors"))
    ids, pix = understanding_inputs(seed=9)
    with torch.no_grad():
        want = _hf(llava_dir)(input_ids=ids, pixel_values=pix).logits
        assert (_fusion(out).text_logits(ids, pixel_values=pix) - want).abs().max().item() <= 1e-4
        assert (_hf(out)(input_ids=ids, pixel_values=pix).logits - want).abs().max().item() <= 1e-6
