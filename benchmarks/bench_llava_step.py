"""Train-step time of LLaVA-Fusion vs LlamaFusion from the same language model, and what pictures add.

    python benchmarks/bench_llava_step.py [--hidden 256] [--layers 4] [--vision-hidden 128] [--repeats 8]

LLaVA-Fusion (``LlamaFusion.from_hf_llama(llava_dir)``) carries the VLM's frozen CLIP vision tower
and projector on the first stage. Two claims are measured here, side by side in one process, fp32 CPU:

  (a) on a generation batch (no pictures) the vision path costs nothing: LLaVA-Fusion's step takes
      the time of LlamaFusion's built from the same language model (``ratio llava/llama`` ~ 1);
  (b) with understanding pairs (``<image>`` placeholders + ``pixel_values``) the frozen vision path
      costs one forward only: the step with pictures minus the same step without them (placeholders
      embedded as plain ids) is about the time of ``model.vision(pixels)`` alone, because nothing in it
      requires grad, so autograd records no graph, saves no activation and computes no vision gradient
      (checked: the features come out with ``requires_grad=False``, every ``vision.*`` grad stays None).

A random LLaVA (``LlavaConfig`` = ``CLIPVisionConfig`` + ``LlamaConfig``, widths from the flags) is
written with ``save_pretrained``; its language model alone is written as a plain HF Llama
(``LlamaForCausalLM`` loading the LLaVA's language-model and LM-head tensors), so both models start
from identical text weights (asserted). The step is a plain loop, not the Trainer (the synthetic
stream has no pictures): ``model(batch)``, loss = lm_loss + 5 x diffusion MSE of the predicted noise,
backward, ``torch.optim.AdamW`` over the trainable parameters. Variants alternate repeat by repeat
(rotating their order) after one warm-up round; the table shows medians and minima.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megafusion.config.schema import ImageConfig  # noqa: E402
from megafusion.model.batch import FusionBatch  # noqa: E402
from megafusion.model.routing import RoutePlan  # noqa: E402

DIFFUSION_WEIGHT = 5.0  # Transfusion's lambda


def write_models(args, root: Path) -> tuple[Path, Path]:
    """A random LLaVA and its language model alone as a plain HF Llama, both with save_pretrained."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=args.picture_size,
        patch_size=args.patch,
    )
    text = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=args.vocab - 3)
    ).eval()
    llava.save_pretrained(root / "llava")
    llama = LlamaForCausalLM(text).eval()
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.save_pretrained(root / "llama")
    return root / "llava", root / "llama"


def generation_rows(args, image: ImageConfig, g: torch.Generator) -> FusionBatch:
    """``--gen-rows`` rows of text with ``--images-per-row`` generation images each (<BOI> latents <EOI>)."""
    b, s, T = args.gen_rows, args.seq, image.tokens_per_image
    ids = torch.randint(3, args.vocab - 3, (b, s), generator=g)
    image_ids = torch.full((b, s), -1, dtype=torch.long)
    gap = s // args.images_per_row
    if gap < T + 3:
        raise SystemExit(f"--seq {s} cannot hold {args.images_per_row} images of {T} tokens (+ BOI/EOI) per row")
    n = 0
    for row in range(b):
        for k in range(args.images_per_row):
            start = k * gap + (gap - T) // 2
            ids[row, start - 1], ids[row, start + T] = args.vocab - 2, args.vocab - 1  # <BOI>, <EOI>
            image_ids[row, start : start + T] = n
            n += 1
    ls = image.latent_size
    return FusionBatch(
        ids,
        image_ids,
        latents=torch.randn(n, image.latent_channels, ls, ls, generator=g),
        timesteps=torch.randint(0, 1000, (n,), generator=g),
        labels=torch.roll(ids, -1, 1),
        loss_mask=(image_ids < 0).float(),
    )


def understanding_rows(args, tokens_per_picture: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``--und-rows`` rows of ``<image>`` placeholders followed by caption text, and their pictures."""
    b, s, P = args.und_rows, args.seq, tokens_per_picture
    ids = torch.randint(3, args.vocab - 3, (b, s), generator=g)
    gap = s // args.pictures_per_row
    if gap < P + 1:
        raise SystemExit(f"--seq {s} cannot hold {args.pictures_per_row} pictures of {P} placeholders per row")
    for row in range(b):
        for k in range(args.pictures_per_row):
            ids[row, k * gap : k * gap + P] = args.vocab - 3
    pixels = torch.randn(b * args.pictures_per_row, 3, args.picture_size, args.picture_size, generator=g)
    return ids, pixels


def combined(gen: FusionBatch, und_ids: torch.Tensor, pixels: torch.Tensor | None, placeholder: int) -> FusionBatch:
    """Generation rows then understanding rows in one micro-batch (loss on caption text, not on placeholders)."""
    ids = torch.cat([gen.input_ids, und_ids])
    image_ids = torch.cat([gen.image_ids, torch.full_like(und_ids, -1)])
    und_mask = (und_ids != placeholder).float()
    batch = FusionBatch(
        ids,
        image_ids,
        latents=gen.latents,
        timesteps=gen.timesteps,
        labels=torch.roll(ids, -1, 1),
        loss_mask=torch.cat([gen.loss_mask, und_mask]),
        pixel_values=pixels,
    )
    batch.route_plan = RoutePlan.build(image_ids)  # as the loader ships it: no device-to-host sync in forward
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096, help="text vocabulary (last 3 ids: <image>, <BOI>, <EOI>)")
    ap.add_argument("--hidden", type=int, default=256, help="text hidden size")
    ap.add_argument("--ffn", type=int, default=688, help="text SwiGLU width")
    ap.add_argument("--layers", type=int, default=4, help="text layers")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=128, help="CLIP hidden size (intermediate: 4x)")
    ap.add_argument("--vision-layers", type=int, default=4, help="CLIP encoder layers (feature layer -2)")
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--picture-size", type=int, default=56, help="CLIP image size in pixels")
    ap.add_argument("--patch", type=int, default=14, help="CLIP patch size")
    ap.add_argument("--image-size", type=int, default=128, help="generation image size (VAE /8, patch 2)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen-rows", type=int, default=2, help="generation rows per micro-batch")
    ap.add_argument("--images-per-row", type=int, default=2, help="generation images per generation row")
    ap.add_argument("--und-rows", type=int, default=2, help="understanding rows added in (b)")
    ap.add_argument("--pictures-per-row", type=int, default=2, help="pictures per understanding row")
    ap.add_argument("--repeats", type=int, default=8, help="timed rounds (after one warm-up round)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); 1 keeps the small ops' timings steady on a shared machine",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megafusion.api import LlamaFusion

    image = ImageConfig(
        image_size=args.image_size, vae_downsample=8, patch_size=2, unet_channels=32, timestep_embed_dim=64
    )
    special = dict(boi_token_id=args.vocab - 2, eoi_token_id=args.vocab - 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_llava_"))
    llava_dir, llama_dir = write_models(args, tmp)
    llava = LlamaFusion.from_hf_llama(str(llava_dir), image=image, params_dtype="fp32", device="cpu", **special).train()
    llama = LlamaFusion.from_hf_llama(str(llama_dir), image=image, params_dtype="fp32", device="cpu", **special).train()
    spec = llava.vision_spec
    assert spec is not None and llama.vision_spec is None
    mine, theirs = dict(llava.named_parameters()), dict(llama.named_parameters())
    assert set(mine) - set(theirs) == {n for n in mine if n.startswith("vision.")}
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs), "the two models' weights differ"

    g = torch.Generator().manual_seed(1)
    gen = generation_rows(args, image, g)
    gen.route_plan = RoutePlan.build(gen.image_ids)
    und_ids, pixels = understanding_rows(args, spec.tokens_per_image, g)
    with_pix = combined(gen, und_ids, pixels, spec.image_token_id)
    without_pix = combined(gen, und_ids, None, spec.image_token_id)
    for batch in (gen, with_pix, without_pix):
        batch.check(image.tokens_per_image, (image.latent_channels, image.latent_size, image.latent_size))
    noise = torch.randn_like(gen.latents)

    opts = {
        id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
        for m in (llava, llama)
    }

    def step(model, batch):
        out = model(batch, check=False)
        loss = out.lm_loss + DIFFUSION_WEIGHT * F.mse_loss(out.image_pred, noise)
        loss.backward()
        opt = opts[id(model)]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def vision_forward():  # as the step runs it: grad mode on, nothing requires grad
        llava.vision(pixels)

    variants = {
        "llama  gen": lambda: step(llama, gen),
        "llava  gen": lambda: step(llava, gen),
        "llava  gen+und, no pixels": lambda: step(llava, without_pix),
        "llava  gen+und + pixels": lambda: step(llava, with_pix),
        "vision forward only": vision_forward,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for it in range(args.repeats + 1):  # round 0 warms up
        shift = it % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            variants[name]()
            if it:
                times[name].append(time.perf_counter() - t0)

    # no vision gradient, no graph: check after a real step with pictures
    step(llava, with_pix)
    out = llava(with_pix, check=False)
    (out.lm_loss + F.mse_loss(out.image_pred, noise)).backward()
    vision_grads = [n for n, p in llava.named_parameters() if n.startswith("vision.") and p.grad is not None]
    vision_trainable = [n for n, p in llava.named_parameters() if n.startswith("vision.") and p.requires_grad]
    opts[id(llava)].zero_grad(set_to_none=True)
    feats = llava.vision(pixels)
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            llava.vision(pixels)
        no_grad_ms = (time.perf_counter() - t0) / args.repeats * 1000

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    low = {k: min(v) * 1000 for k, v in times.items()}
    n_vis = sum(p.numel() for p in llava.vision.parameters())
    print(
        f"text: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab}; vision: CLIP hidden "
        f"{args.vision_hidden}, {spec.layers_needed}/{args.vision_layers} layers run, {args.picture_size} px / patch "
        f"{args.patch} -> {spec.tokens_per_image} features, {n_vis / 1e6:.2f}M params; fp32 CPU, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print(
        f"generation batch {args.gen_rows} x {args.seq} ({gen.num_images} images of {image.tokens_per_image} tokens); "
        f"(b) adds {args.und_rows} understanding rows with {pixels.shape[0]} pictures"
    )
    print(f"  {'variant':<28s} {'median ms':>10s} {'min ms':>10s}")
    for k in names:
        print(f"  {k:<28s} {med[k]:10.1f} {low[k]:10.1f}")
    extra = med["llava  gen+und + pixels"] - med["llava  gen+und, no pixels"]
    vis = med["vision forward only"]
    lo_extra = low["llava  gen+und + pixels"] - low["llava  gen+und, no pixels"]
    print(
        f"ratio llava/llama = {med['llava  gen'] / med['llama  gen']:.3f}   (target ~1.0: no pictures, no cost; "
        f"of the fastest runs {low['llava  gen'] / low['llama  gen']:.3f})"
    )
    print(
        f"extra step time with pictures = {extra:.1f} ms (fastest runs {lo_extra:.1f} ms); vision forward alone = "
        f"{vis:.1f} ms (under no_grad {no_grad_ms:.1f} ms) -> extra/forward = {extra / vis:.2f}   "
        "(target ~1: a forward only; within the steps' noise when the tower is small)"
    )
    print(
        f"vision features requires_grad={feats.requires_grad} grad_fn={feats.grad_fn}; vision params trainable "
        f"{len(vision_trainable)}, with a .grad after backward {len(vision_grads)}"
    )


if __name__ == "__main__":
    main()
