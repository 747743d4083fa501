"""Shared test fixtures: tiny HF Llamas, tiny image configs, mixed batches, spawned gloo ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megafusion.config.schema import ImageConfig

TINY_IMAGE = ImageConfig(
    image_size=32,
    vae_downsample=4,
    latent_channels=4,
    io="unet",
    patch_size=2,
    unet_channels=32,
    timestep_embed_dim=64,
)


def make_tiny_hf_llama(
    path: str | Path,
    *,
    vocab: int = 300,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    tie: bool = False,
    seed: int = 0,
    rope_scaling: bool = True,
) -> Path:
    """A random-weight HF Llama (GQA, llama3 rope scaling, non-trivial norms) saved with save_pretrained
    (safetensors), through the demo's writer."""
    from megafusion.config.schema import ModelConfig, RopeScalingConfig
    from megafusion.demo.tiny_llama import write_random_hf_llama

    rope = (
        dict(rope_theta=500000.0, rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 32))
        if rope_scaling
        else dict(rope_theta=10000.0, rope_scaling=RopeScalingConfig("none"))
    )
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=ffn,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 1,
        **rope,
    )
    return write_random_hf_llama(cfg, path, seed=seed, norm_noise=0.1)


def mixed_batch(vocab: int, image: ImageConfig = TINY_IMAGE, seed: int = 0, b: int = 2, s: int = 64):
    """Two rows, three images, two packed documents in row 1, labels/loss mask on text."""
    from megafusion.model.batch import FusionBatch

    g = torch.Generator().manual_seed(seed)
    T = image.tokens_per_image
    ids = torch.randint(0, vocab - 2, (b, s), generator=g)
    image_ids = torch.full((b, s), -1, dtype=torch.long)
    image_ids[0, 5 : 5 + T] = 0
    image_ids[1, 2 : 2 + T] = 1
    image_ids[1, 30 : 30 + T] = 2
    doc = torch.zeros(b, s, dtype=torch.long)
    doc[1, 26:] = 1
    pos = torch.arange(s).expand(b, s).clone()
    pos[1, 26:] = torch.arange(s - 26)
    ls = image.latent_size
    latents = torch.randn(3, image.latent_channels, ls, ls, generator=g)
    timesteps = torch.randint(0, 1000, (3,), generator=g)
    labels = torch.roll(ids, -1, 1)
    loss_mask = (image_ids < 0).float()
    return FusionBatch(ids, image_ids, pos, doc, latents, timesteps, labels, loss_mask)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, port, out_dir, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        _leave_together()
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _leave_together() -> None:
    """Barrier, then tear the process group down, so that no rank exits while a peer still talks to it: a rank
    whose peer's sockets close under gloo's background threads at interpreter exit can abort (exit code -6)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; return each rank's result.

    A rank that raises fails the test with its traceback; a hang is killed after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world, port, out_dir, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errs = [Path(out_dir, f"rank{r}.err") for r in range(world)]
        msgs = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errs) if e.exists()]
        if msgs:
            raise AssertionError("distributed worker failed:\n" + "\n".join(msgs))
        if hung:
            raise AssertionError(f"ranks {hung} hung for more than {timeout}s")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


LLAVA_IMAGE_TOKEN = 296  # the tiny LLaVA's <image> placeholder; <BOI>/<EOI> are 297/298 (not the last two ids)


def make_tiny_hf_llava(path: str | Path, *, seed: int = 0, vision_type: str = "clip_vision_model") -> Path:
    """A random-weight HF ``LlavaForConditionalGeneration`` (CLIP 28 px / patch 7 -> 16 features, 3 vision
    layers, feature layer -2; Llama text tower with GQA), every weight perturbed so no norm is all ones,
    saved by ``save_pretrained`` (safetensors). ``vision_type`` only rewrites config.json (bad-input tests)."""
    import json

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7
    )
    text = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = Path(path)
    model.save_pretrained(path)
    if vision_type != "clip_vision_model":
        cfg = json.loads((path / "config.json").read_text())
        cfg["vision_config"]["model_type"] = vision_type
        (path / "config.json").write_text(json.dumps(cfg))
    return path
