"""Image sampling: the text prefix's keys/values cached across denoising steps vs recomputing the sequence.

    python benchmarks/bench_sampling.py [--hidden 512] [--layers 8] [--steps 10] [--prompts 64 256]

Side by side in one run, one process, fp32 CPU, 256 image tokens (128 px images, VAE
factor 4, patch 2), batch of 2 prompts, DDIM:
  cached : one pass over the prompt, then each step runs the 256 image tokens against the cache
  full   : each step runs prompt + <BOI> + image tokens from scratch
Prints denoising steps/s of each (the cached figure includes its one prefix pass) and the
ratio cached/full per prompt length; the target is >= 1.8 at 256 prompt tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from megafusion import LlamaFusion
    from megafusion.config.schema import ImageConfig, ModelConfig

    torch.manual_seed(0)
    image = ImageConfig(
        image_size=128,
        vae_downsample=4,
        latent_channels=4,
        io="unet",
        patch_size=2,
        unet_channels=64,
        timestep_embed_dim=128,
    )
    cfg = ModelConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 128,
        ffn_hidden_size=int(args.hidden * 2.75),
        boi_token_id=4094,
        eoi_token_id=4095,
        image=image,
        max_position_embeddings=4096,
    )
    model = LlamaFusion(cfg)
    model.init_random_text_tower()
    model.init_image_tower_from_text()
    model.eval()
    print(
        f"[bench] {args.layers} layers x {args.hidden} hidden, {image.tokens_per_image} image tokens, "
        f"batch {args.batch}, {args.steps} DDIM steps, {torch.get_num_threads()} threads"
    )
    for length in args.prompts:
        prompts = [
            [1] + torch.randint(3, 4000, (length - 1,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(args.batch)
        ]
        best = {}
        for use_cache in (True, False, True, False)[: 2 * args.repeats]:
            t0 = time.perf_counter()
            model.generate_images(
                prompts, num_steps=args.steps, use_cache=use_cache, generator=torch.Generator().manual_seed(0)
            )
            dt = time.perf_counter() - t0
            best[use_cache] = min(best.get(use_cache, float("inf")), dt)
        cached, full = args.steps / best[True], args.steps / best[False]
        print(
            f"prompt {length:4d} tokens: cached {cached:6.2f} steps/s, full {full:6.2f} steps/s, "
            f"ratio cached/full = {cached / full:.2f}" + ("  (target >= 1.8)" if length == 256 else "")
        )


if __name__ == "__main__":
    main()
