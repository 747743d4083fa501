"""One TP=1 train step of a 2-layer LlamaFusion at Llama-3 8B widths, bf16 on CUDA, through the real Trainer.

What only the GPU shows at these widths: the bf16 step of a 128256-row vocabulary and 14336-wide
FFN runs and is finite; the frozen text tower does not move by one bit while the image tower trains;
and the micro-batch gradients accumulate in fp32 (DeepSpeed ``data_types.grad_accum_dtype=fp32``,
``training/engine.py``), not in the bf16 ``.grad`` that megatron-core's schedule would otherwise sum
into: at 128 micro-batches per step a bf16 sum keeps only the leading bits of the late ones.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from megafusion.parallel.grads import accumulated_grad
from tests.gpu.common import GPU_ONLY

pytestmark = GPU_ONLY

WIDTHS = [  # Llama-3.1 8B (the llama3-8b-fusion preset), 2 of its 32 layers
    "model.hidden_size=4096",
    "model.ffn_hidden_size=14336",
    "model.num_attention_heads=32",
    "model.num_kv_heads=8",
    "model.vocab_size=128256",
    "model.boi_token_id=128002",
    "model.eoi_token_id=128003",
    "model.num_layers=2",
]

STEP = [
    "parallel.params_dtype=bf16",
    "data.seq_length=512",
    "data.micro_batch_size=1",
    "data.global_batch_size=2",  # 2 micro-batches: the schedule accumulates, so the accumulation dtype matters
    "optim.warmup_steps=1",  # full lr at step 0 (warmup would start it at lr / warmup_steps)
    "optim.lr=1e-3",  # a bf16 weight of ~0.02 moves by ~1e-3 per Adam step: many ulps, visibly changed
    "logging.tensorboard=false",
    "checkpoint.interval=1000000",
]

IMAGE_TOWER_MATRIX = re.compile(r"layers\.\d+\.(qkv|o|gate_up|down)\.image\.weight$")


@pytest.fixture(scope="module")
def hf_8b_width(tmp_path_factory):
    """A random HF Llama at 8B widths with 2 layers (~1.5B parameters, mostly the 128256-row embedding and head)."""
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    cfg = load_config("tiny", WIDTHS)
    return str(write_random_hf_llama(cfg.model, tmp_path_factory.mktemp("hf8b") / "llama", seed=5, max_params=None))


def test_train_step_at_8b_widths_bf16(hf_8b_width, tmp_path):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.engine import deepspeed_config
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", WIDTHS + STEP + [f"logging.run_dir={tmp_path}"])
    placement = init_model_parallel(1, 1)  # the tier's one-rank group (NCCL on cuda:0), whoever made it first
    assert placement.device.type == "cuda"
    trainer = Trainer(cfg, hf_8b_width, log=lambda s: None)
    assert trainer.num_micro == 2
    model = trainer.models[0]
    assert next(model.parameters()).device.type == "cuda"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()), "parallel.params_dtype=bf16 not honoured"
    for name in ("embedding.weight", "lm_head.weight", "layers.1.gate_up.text.weight"):  # (stage prefix "core.")
        assert any(n == name or n.endswith("." + name) for n in frozen), name

    # fp32 accumulation, the configuration: what build_engine hands DeepSpeed, and what DeepSpeed made of it
    n_trainable = sum(p.numel() for p in trainer.trainable_parameters())
    ds = deepspeed_config(cfg, bf16=True, num_trainable=n_trainable)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == "fp32", ds
    assert trainer.engine.get_data_types() == (torch.bfloat16, torch.float32)

    # fp32 accumulation, the buffers: every trainable parameter's summed gradient, just before DeepSpeed reduces
    seen: dict[str, tuple[torch.dtype, bool, bool]] = {}
    reduce = trainer.engine.allreduce_gradients

    def spying_reduce(*args, **kwargs):
        for n, p in model.named_parameters():
            if p.requires_grad:
                buf = accumulated_grad(p)  # fp32 p.grad_accum under bf16 (parallel/grads.py)
                seen[n] = (
                    None if buf is None else buf.dtype,
                    buf is not None and bool(torch.isfinite(buf).all()),
                    buf is not None and bool(buf.abs().max() > 0),
                )
        return reduce(*args, **kwargs)

    trainer.engine.allreduce_gradients = spying_reduce
    stats = trainer.train_step()
    trainer.engine.allreduce_gradients = reduce
    torch.cuda.synchronize()

    assert math.isfinite(stats.loss) and math.isfinite(stats.lm_loss) and math.isfinite(stats.diffusion_loss), stats
    assert math.isfinite(stats.grad_norm) and stats.grad_norm > 0 and trainer.skipped == 0, stats
    assert seen.keys() == trainable.keys()
    not_fp32 = {n: d for n, (d, _, _) in seen.items() if d != torch.float32}
    assert not not_fp32, f"accumulated gradients not in fp32: {not_fp32}"
    assert all(finite for _, finite, _ in seen.values())
    assert all(seen[n][2] for n in seen if IMAGE_TOWER_MATRIX.search(n)), "an image-tower matrix got no gradient"

    moved_text = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen[n])]
    assert not moved_text, f"frozen text tower changed: {moved_text[:5]}"
    matrices = [n for n in trainable if IMAGE_TOWER_MATRIX.search(n)]
    assert len(matrices) == 2 * 4
    params = dict(model.named_parameters())
    still = [n for n in matrices if torch.equal(params[n], trainable[n])]
    assert not still, f"image-tower weights did not change: {still}"
    for unet in ("image_in", "image_out"):
        names = [n for n in trainable if re.search(rf"(^|\.){unet}\.", n)]
        assert names and any(not torch.equal(params[n], trainable[n]) for n in names), unet
    assert stats.mem_gb > 0
