"""TP=2 (two spawned gloo ranks) against TP=1 and against transformers' Llama."""

import pytest
import torch

from tests.helpers import TINY_IMAGE, mixed_batch, run_distributed

pytestmark = pytest.mark.distributed


def _perturb_image_tower(model):
    """Make the image tower differ from the text tower with an elementwise map (commutes with sharding)."""
    with torch.no_grad():
        for m in model.routed_modules():
            m.image.weight.mul_(1.25).add_(0.003)
            if getattr(m, "norm", None) is not None:
                m.norm.image.mul_(0.8).add_(0.1)


def _mixed_step(model):
    from megafusion.checkpoint.gather import gather_full
    from megafusion.parallel.grads import allreduce_sequence_parallel_grads

    b = mixed_batch(model.cfg.vocab_size)
    out = model(b)
    target = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(9))
    diff = ((out.image_pred - target) ** 2).mean()
    (out.lm_loss + 5.0 * diff).backward()
    allreduce_sequence_parallel_grads(model, model.pctx.tp_group)
    grads = gather_full(model, "grad")
    from megafusion.model.llamafusion import is_text_tower_param

    unfrozen_text = [n for n, p in model.named_parameters() if is_text_tower_param(n) and p.requires_grad]
    return {
        "lm_loss": out.lm_loss.detach(),
        "diff": diff.detach(),
        "pred": out.image_pred.detach(),
        "n_unfrozen_text": torch.tensor(len(unfrozen_text)),
        **{"grad/" + k: v for k, v in grads.items()},
    }


def _worker(rank, world, hf_path, sequence_parallel):
    from megafusion import LlamaFusion
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel

    init_model_parallel(world, 1)
    pctx = ParallelContext.current(sequence_parallel=sequence_parallel)
    model = LlamaFusion.from_hf_llama(hf_path, image=TINY_IMAGE, pctx=pctx)
    ids = torch.randint(0, 298, (2, 30), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        logits = model.text_logits(ids)
    _perturb_image_tower(model)
    return {"logits": logits, "ids": ids, **_mixed_step(model)}


@pytest.fixture(scope="module")
def tp1_reference(tiny_hf):
    from megafusion import LlamaFusion

    model = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    _perturb_image_tower(model)
    return _mixed_step(model)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["sp_off", "sp_on"])
def test_tp2_matches_tp1_and_transformers(tiny_hf, tp1_reference, sequence_parallel):
    from transformers import LlamaForCausalLM

    results = run_distributed(_worker, 2, str(tiny_hf), sequence_parallel)
    r0, r1 = results
    # text-only logits at TP=2 equal HF's
    hf = LlamaForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = hf(r0["ids"]).logits
    assert (r0["logits"] - ref_logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(r1["logits"], r0["logits"], atol=0, rtol=0)
    # mixed text+image: same losses, outputs and gradients as TP=1
    for key in ("lm_loss", "diff", "pred"):
        torch.testing.assert_close(r0[key], tp1_reference[key], atol=1e-5, rtol=1e-4)
    grad_keys = [k for k in tp1_reference if k.startswith("grad/")]
    assert grad_keys == [k for k in r0 if k.startswith("grad/")]
    for k in grad_keys:
        torch.testing.assert_close(r0[k], tp1_reference[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(r1[k], r0[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k} rank1: {m}")
    # gradients are not trivially zero, and frozen weights got none
    assert r0["grad/layers.1.qkv.image.weight"].abs().sum() > 0
    assert r0["grad/image_in.conv_in.weight"].abs().sum() > 0
    assert r0["n_unfrozen_text"].item() == 0  # every rank's text-tower shards are frozen
