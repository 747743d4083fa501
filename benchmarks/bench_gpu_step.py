"""GPU train-step throughput and MFU: a few Llama-3 8B-width LlamaFusion layers in bf16 on one CUDA device.

    python benchmarks/bench_gpu_step.py [--layers 2] [--seq 4096] [--micro-batches 2] [--iters 5] [--peak-tflops 989]
    python benchmarks/bench_gpu_step.py --device cpu     # a tiny smoke configuration: checks the script end to end

The real Trainer step (megatron-core schedule over the micro-batches, forward + backward, then
DeepSpeed ZeRO-1 reduce + AdamW step) at 8B widths (hidden 4096, FFN 14336, 32 / 8 heads, vocab
128256) with the 8B preset's image side (256 px -> 256 tokens per image, U-Nets of 256 channels)
on packed text+image sequences (about half image tokens). Printed for the whole step and for its
forward + backward alone: ms, tokens/s, achieved TFLOP/s and MFU.

FLOPs are ``training/flops.py``'s, the count the trainer logs: frozen text-tower matmuls pay
forward + input gradient only, attention only the (query, key) pairs the hybrid mask allows,
the LM head only text tokens, the U-Nets torch's flop counter. The peak is ``--peak-tflops``, else
``training/metrics.py`` ``peak_flops`` (a table of GPUs: H100 / H200 bf16 dense 989 TFLOP/s).
Without CUDA it prints one line and exits 0, unless ``--device cpu`` asks for the smoke run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

WIDTH_8B = dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, seq=4096, image_size=256, unet=256)
"""Llama-3.1 8B and the llama3-8b-fusion preset's image side: the CUDA defaults."""

SMOKE = dict(hidden=128, ffn=352, heads=4, kv_heads=2, vocab=512, seq=256, image_size=32, unet=32)
"""The tiny preset's widths: the ``--device cpu`` defaults, seconds on two cores."""


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, help="default 4096 on CUDA, 128 on the CPU")
    ap.add_argument("--ffn", type=int, help="default 14336 / 352")
    ap.add_argument("--heads", type=int, help="default 32 / 4")
    ap.add_argument("--kv-heads", type=int, help="default 8 / 2")
    ap.add_argument("--vocab", type=int, help="default 128256 / 512")
    ap.add_argument("--seq", type=int, help="tokens per packed sequence, default 4096 / 256")
    ap.add_argument("--image-size", type=int, help="pixels (VAE /8 on CUDA, /4 on the CPU), default 256 / 32")
    ap.add_argument("--unet", type=int, help="U-Net channels, default 256 / 32")
    ap.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (accumulated)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto", help="auto: flex on CUDA")
    ap.add_argument("--iters", type=int, default=5, help="timed steps (after the warm-up ones)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first: FlexAttention compiles, allocator")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (0: metrics.peak_flops)")
    return ap.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_random_llama(model_cfg, path: Path, device: str, dtype: torch.dtype) -> Path:
    """A random-weight HF Llama of ``model_cfg``'s size, built on ``device`` in ``dtype`` and saved.

    ``demo.tiny_llama.write_random_hf_llama`` builds in fp32 on the CPU, which at 8B widths
    (~1.5B parameters with the 128256-row embedding and head) takes longer than the benchmark.
    """
    from transformers import LlamaForCausalLM

    from megafusion.demo.tiny_llama import hf_llama_config

    with torch.device(device):
        model = LlamaForCausalLM(hf_llama_config(model_cfg)).to(dtype)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def main() -> None:
    args = _args()
    if args.device == "auto":
        if not torch.cuda.is_available():
            print(
                "bench_gpu_step: no CUDA device (torch.cuda.is_available() is False); run it on a GPU "
                "machine, or pass --device cpu for the tiny smoke configuration"
            )
            return
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_step: --device cuda, but torch sees no CUDA device")
    dims = dict(WIDTH_8B if args.device == "cuda" else SMOKE)
    for key in dims:
        given = getattr(args, key.replace("-", "_"), None)
        if given is not None:
            dims[key] = given
    vae_down = 8 if args.device == "cuda" else 4

    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.flops import attention_pairs, image_io_flops_per_image, transformer_flops_per_step
    from megafusion.training.metrics import peak_flops, peak_memory_gb
    from megafusion.training.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_step_"))
    v = dims["vocab"]
    cfg = load_config(
        "tiny",
        [
            f"model.hidden_size={dims['hidden']}",
            f"model.num_layers={args.layers}",
            f"model.ffn_hidden_size={dims['ffn']}",
            f"model.num_attention_heads={dims['heads']}",
            f"model.num_kv_heads={dims['kv_heads']}",
            f"model.vocab_size={v}",
            f"model.boi_token_id={128002 if v == 128256 else v - 2}",
            f"model.eoi_token_id={128003 if v == 128256 else v - 1}",
            f"model.max_position_embeddings={max(512, dims['seq'])}",
            f"model.attention_backend={args.attention}",
            f"model.image.image_size={dims['image_size']}",
            f"model.image.vae_downsample={vae_down}",
            f"model.image.unet_channels={dims['unet']}",
            f"model.image.timestep_embed_dim={max(64, dims['unet'])}",
            f"data.seq_length={dims['seq']}",
            f"data.micro_batch_size={args.micro}",
            f"data.global_batch_size={args.micro * args.micro_batches}",
            f"parallel.params_dtype={args.dtype}",
            f"parallel.device={args.device}",
            f"logging.peak_tflops={args.peak_tflops}",
            "logging.tensorboard=false",
            f"logging.run_dir={tmp / 'run'}",
            "checkpoint.interval=1000000",
            "optim.warmup_steps=1",
        ],
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf_dir = write_random_llama(cfg.model, tmp / "llama", args.device, dtype)
    init_model_parallel(1, 1, device=args.device)
    trainer = Trainer(cfg, str(hf_dir), log=lambda s: None)
    device = trainer.device
    T = cfg.model.image.tokens_per_image
    trainer.stream.caption_len = (max(1, T // 2), max(2, 3 * T // 2))  # captions ~ as long as images: ~half text

    def step_items(step: int) -> list:
        return [trainer.stream.item(step, m) for m in range(trainer.num_micro)]

    def step_flops(items: list) -> tuple[float, int, float]:
        """(training FLOPs, tokens, image-token share) of one step's micro-batches, as the trainer counts them."""
        text = sum(int((it.batch.image_ids < 0).sum()) for it in items)
        image = sum(int((it.batch.image_ids >= 0).sum()) for it in items)
        seqs = sum(it.batch.input_ids.shape[0] for it in items)
        pairs = sum(attention_pairs(it.batch.document_ids, it.batch.image_ids) for it in items)
        n_img = sum(it.batch.num_images for it in items)
        flops = transformer_flops_per_step(cfg, text, image, seqs, pairs) + n_img * image_io_flops_per_image(cfg)
        return flops, text + image, image / (text + image)

    # the whole step: schedule forward + backward, DeepSpeed reduce + AdamW
    step_times, step_counts = [], []
    for it in range(args.warmup + args.iters):
        _sync(device)
        t0 = time.perf_counter()
        stats = trainer.train_step()
        _sync(device)
        if it >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            step_counts.append(step_flops(step_items(trainer.step - 1)))
        if stats.skipped or not math.isfinite(stats.loss):
            sys.exit(f"bench_gpu_step: step {trainer.step} was not finite (loss {stats.loss}); numbers would mislead")

    # forward + backward alone, on the same kind of batches (no reduce, no optimizer step)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    fb_times, fb_counts = [], []
    for it in range(1 + args.iters):  # one warm-up: the schedule without the step
        items = step_items(trainer.step + it)
        _sync(device)
        t0 = time.perf_counter()
        fb(
            forward_step_func=trainer._forward_step,
            data_iterator=iter(items),
            model=trainer.models,
            num_microbatches=trainer.num_micro,
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.data.micro_batch_size,
            forward_only=False,
        )
        _sync(device)
        if it:
            fb_times.append(time.perf_counter() - t0)
            fb_counts.append(step_flops(items))
        trainer.optimizer.zero_grad()  # drop the gradients (DeepSpeed's fp32 accumulation buffers too)

    peak = peak_flops(cfg)
    where = (
        "--peak-tflops"
        if args.peak_tflops > 0
        else (torch.cuda.get_device_name(device) + " table")
        if device.type == "cuda"
        else "measured CPU fp32 matmul"
    )
    tokens = step_counts[0][1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"dims: {args.layers} layers, hidden {dims['hidden']}, ffn {dims['ffn']}, heads {dims['heads']}/"
        f"{dims['kv_heads']}, vocab {v}; {trainer.num_micro} micro-batches x {args.micro} x {dims['seq']} = "
        f"{tokens} tokens/step ({statistics.mean(c[2] for c in step_counts):.0%} image tokens, {T} per image), "
        f"{args.dtype}, attention {args.attention}, {name}"
    )
    for label, times, counts in (
        ("train step (fwd+bwd+ZeRO step)", step_times, step_counts),
        ("forward+backward only", fb_times, fb_counts),
    ):
        dt = statistics.median(times)
        flops = statistics.mean(c[0] for c in counts)
        toks = statistics.mean(c[1] for c in counts)
        print(
            f"  {label:<31} {dt * 1000:9.1f} ms  {toks / dt:10.0f} tok/s  {flops / dt / 1e12:8.2f} TFLOP/s  "
            f"MFU {100 * flops / dt / peak:5.1f}%"
        )
    print(
        f"peak {peak / 1e12:.1f} TFLOP/s ({where}); {step_counts[0][0] / 1e12:.2f} TFLOP per step "
        f"(training/flops.py); peak memory {peak_memory_gb():.2f} GB; loss {stats.loss:.4f}"
    )


if __name__ == "__main__":
    main()
