"""The Transfusion-style baseline (model.architecture=transfusion): one tower, every weight trained.

Reference: the recipe's own two-tower model with the image tower copied from the text tower
computes the same function, so at initialisation the two must agree on every output, and
the shared weights' gradient must be the sum of the two towers' gradients.
"""

import pytest
import torch

from megafusion import LlamaFusion
from megafusion.checkpoint.gather import shard_kind
from tests.helpers import TINY_IMAGE, mixed_batch


@pytest.fixture(scope="module")
def pair(tiny_hf):
    fusion = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    shared = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE, architecture="transfusion")
    return fusion, shared


def test_one_tower_every_weight_trains(pair):
    fusion, shared = pair
    names = [n for n, _ in shared.named_parameters()]
    assert not [n for n in names if ".image.weight" in n or n.endswith("norm.image")]
    assert all(p.requires_grad for p in shared.parameters())
    assert not fusion.layers["0"].qkv.text.weight.requires_grad
    # the baseline holds the text tower once: fewer parameters than the recipe by the image tower
    tower = sum(p.numel() for n, p in fusion.named_parameters() if ".image.weight" in n or n.endswith("norm.image"))
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in fusion.parameters()) - tower


def test_same_function_as_copied_image_tower(pair):
    fusion, shared = pair
    batch = mixed_batch(300)
    with torch.no_grad():
        a, b = fusion(batch), shared(batch)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.image_pred, a.image_pred, atol=1e-6, rtol=1e-6)


def test_shared_gradient_is_sum_of_tower_gradients(tiny_hf):
    fusion = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    for p in fusion.parameters():
        p.requires_grad_(True)  # the reference: both towers unfrozen
    shared = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE, architecture="transfusion")
    batch = mixed_batch(300, seed=5)
    for m in (fusion, shared):
        out = m(batch)
        (out.lm_loss + 5 * out.image_pred.square().mean()).backward()
    f = dict(fusion.named_parameters())
    checked = 0
    for name, p in shared.named_parameters():
        ref = f[name].grad
        twin = (
            name.replace(".text.", ".image.")
            if ".text." in name
            else (name[: -len("text")] + "image" if name.endswith("norm.text") else None)
        )
        if twin is not None:
            ref = ref + f[twin].grad
            checked += 1
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert checked == 6 * 2  # qkv/o/gate_up/down weights + 2 norms, in each of the 2 layers
    assert shared.embedding.weight.grad.abs().sum() > 0 and shared.lm_head.weight.grad.abs().sum() > 0
    assert shard_kind("layers.0.qkv.text.weight") == "qkv"


def test_tools_refuse_baseline_checkpoints_with_reasons(tmp_path, tiny_hf):
    from megafusion.checkpoint.convert import convert_hf_llama
    from megafusion.config import load_config

    cfg = load_config("tiny", ["model.architecture=transfusion"])
    with pytest.raises(ValueError, match="checkpoint.hf_llama"):
        convert_hf_llama(tiny_hf, tmp_path / "out", cfg, tp=1, pp=1, progress=False)
    from megafusion.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="model.architecture='twotower'"):
        validate_config(load_config("tiny", ["model.architecture=twotower"]))
