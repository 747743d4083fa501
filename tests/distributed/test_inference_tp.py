"""Captioning, image sampling and text generation at TP=2 (gloo) give the TP=1 results."""

import dataclasses
import json
import shutil

import torch

from tests.helpers import TINY_IMAGE, make_tiny_hf_llama, run_distributed

BOI, EOI, BOS = 297, 298, 1
PROMPTS = [[BOS, 9], [BOS, 5, 6, 7, 8]]


def _pretrained_dir(tmp_path):
    """An exported-style directory (HF text tower + a perturbed image side) built at TP=1."""
    from safetensors.torch import save_file

    from megafusion import LlamaFusion
    from megafusion.checkpoint.export import CONFIG_FILE, IMAGE_FILE
    from megafusion.model.llamafusion import is_text_tower_param

    hf = make_tiny_hf_llama(tmp_path / "hf", seed=21)
    m = LlamaFusion.from_hf_llama(str(hf), image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI)
    g = torch.Generator().manual_seed(2)
    out = tmp_path / "pretrained"
    shutil.copytree(hf, out)
    with torch.no_grad():
        side = {
            n: (p + torch.randn(p.shape, generator=g) * 0.02).contiguous()
            for n, p in m.named_parameters()
            if not is_text_tower_param(n)
        }
    save_file(side, str(out / IMAGE_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model": dataclasses.asdict(m.cfg)}))
    return out


def _run(model):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, 290, (2, 6), generator=torch.Generator().manual_seed(6))
    return {
        "images": model.generate_images(
            PROMPTS, num_steps=5, guidance_scale=2.0, generator=torch.Generator().manual_seed(1)
        ),
        "ddpm": model.generate_images(PROMPTS, num_steps=4, sampler="ddpm", generator=torch.Generator().manual_seed(3)),
        "captions": torch.tensor(model.caption(latents, bos_token_id=BOS, max_new_tokens=6)),
        "text": model.generate_text(ids, max_new_tokens=8),
    }


def _tp_worker(rank, world, path):
    from megafusion import LlamaFusion
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel

    init_model_parallel(world, 1)
    model = LlamaFusion.from_pretrained(path, pctx=ParallelContext.current()).eval()
    assert model.pctx.tp_size == world
    return _run(model)


def test_tp2_matches_tp1(tmp_path):
    from megafusion import LlamaFusion

    path = _pretrained_dir(tmp_path)
    ref = _run(LlamaFusion.from_pretrained(str(path)).eval())
    got = run_distributed(_tp_worker, 2, str(path))
    for r in got:
        torch.testing.assert_close(r["images"], ref["images"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r["ddpm"], ref["ddpm"], atol=1e-4, rtol=1e-4)
        assert torch.equal(r["captions"], ref["captions"])
        assert torch.equal(r["text"], ref["text"])
