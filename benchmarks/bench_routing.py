"""Forward+backward time of one routed LlamaFusion layer vs a dense layer vs compute-both-and-select.

    python benchmarks/bench_routing.py [--tokens 4096] [--hidden 1024] [--iters 3]

All three variants run the same layer object (the real ``FusionLayer`` on
megatron-core shards, one-rank gloo group, fp32 CPU) on the same tokens and
the same hybrid mask, interleaved run by run so machine drift hits all alike.
Each run starts with ``prepare`` on a batch that carries its routing plan
(``FusionBatch.route_plan``, built on the CPU as the data loader builds it), as a
training forward does: the routes cost no device-to-host sync, only the gathers.

  dense   : every token through the text tower (one tower; what a plain Llama layer costs)
  routed  : 50/50 text/image tokens, each through its own tower (megafusion)
  select  : both towers on every token, then torch.where by modality (the naive approach)

Both towers are trainable here so dense and routed do the same backward work.
Prints the median times and the ratios routed/dense (target <= 1.02) and select/dense, and the
routed/dense ratio of the fastest runs (less sensitive to other load on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megafusion.api import LlamaFusion  # noqa: E402
from megafusion.config.schema import ImageConfig, ModelConfig, RopeScalingConfig  # noqa: E402
from megafusion.model.attention_core import shared_attention  # noqa: E402
from megafusion.model.batch import FusionBatch  # noqa: E402
from megafusion.model.norm import rms_norm  # noqa: E402
from megafusion.model.rope import apply_rope  # noqa: E402
from megafusion.model.routing import RoutePlan  # noqa: E402

TARGET = 1.02  # routed/dense, issue 17


def build(hidden: int, heads: int, kv_heads: int, ffn: int) -> LlamaFusion:
    cfg = ModelConfig(
        vocab_size=1024,
        hidden_size=hidden,
        num_layers=1,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=ffn,
        rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 8192),
        boi_token_id=1022,
        eoi_token_id=1023,
        image=ImageConfig(image_size=32, vae_downsample=4, patch_size=2, unet_channels=32, timestep_embed_dim=64),
    )
    model = LlamaFusion(cfg, params_dtype="fp32")
    model.init_random_text_tower(seed=0)
    model.init_image_tower_from_text()
    with torch.no_grad():
        for m in model.routed_modules():
            m.image.weight.mul_(1.1)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_batch(tokens: int, image_tokens: int, all_text: bool) -> FusionBatch:
    """One row of `tokens`; alternating text runs and images of `image_tokens` (50/50 overall), with the
    routing plan the loader ships."""
    ids = torch.randint(0, 1000, (1, tokens))
    image_ids = torch.full((1, tokens), -1)
    if not all_text:
        n = 0
        for start in range(image_tokens, tokens, 2 * image_tokens):
            image_ids[0, start : start + image_tokens] = n
            n += 1
    return FusionBatch(ids, image_ids, route_plan=RoutePlan.build(image_ids))


def prepared(model, batch: FusionBatch, mask):
    """``prepare`` as in a training forward (routes from the shipped plan), then the shared mask."""
    state = model.prepare(batch)
    assert state.inputs.routes.full is batch.route_plan.full  # the plan was used, nothing rebuilt
    state.inputs.mask = mask  # identical attention work for every variant
    return state


def routed_step(model, x, batch, mask):
    state = prepared(model, batch, mask)
    y = model.layers["0"](x, state.inputs)
    y.square().mean().backward()


def select_step(model, x, batch, mask):
    """Both towers on all N tokens, pick per token: the approach routing avoids."""
    state = prepared(model, batch, mask)
    layer, inp, is_image = model.layers["0"], state.inputs, state.is_image
    s, b, d = inp.seq_len, inp.batch_size, layer.head_dim
    h = x.reshape(-1, x.shape[-1])
    sel = is_image[:, None]

    def both_col(mod, z):
        t = F.linear(rms_norm(z, mod.norm.text, mod.norm.eps), mod.text.weight)
        i = F.linear(rms_norm(z, mod.norm.image, mod.norm.eps), mod.image.weight)
        return torch.where(sel, i, t)

    def both_row(mod, z):
        return torch.where(sel, F.linear(z, mod.image.weight), F.linear(z, mod.text.weight))

    qkv = both_col(layer.qkv, h).view(s, b, layer.heads + 2 * layer.kv_heads, d)  # [s, b, hq+2hkv, d]
    q, k, v = qkv.split([layer.heads, layer.kv_heads, layer.kv_heads], dim=2)
    q = apply_rope(q.permute(1, 2, 0, 3), inp.cos, inp.sin)
    k = apply_rope(k.permute(1, 2, 0, 3), inp.cos, inp.sin)
    o = shared_attention(q, k, v.permute(1, 2, 0, 3), inp.mask)
    o = o.permute(2, 0, 1, 3).reshape(s * b, layer.heads * d)  # [s*b, hq d]
    h = h + both_row(layer.o, o)
    gate, up = both_col(layer.gate_up, h).chunk(2, dim=-1)
    h = h + both_row(layer.down, F.silu(gate) * up)
    h.square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=3584, help="SwiGLU width (Llama-3 ratio 3.5x)")
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build(args.hidden, args.heads, args.kv_heads, args.ffn)
    x = torch.randn(args.tokens, 1, args.hidden)
    mixed = make_batch(args.tokens, args.image_tokens, all_text=False)
    text_ids = torch.full_like(mixed.image_ids, -1)
    dense_batch = FusionBatch(mixed.input_ids, text_ids, route_plan=RoutePlan.build(text_ids))
    mask = model.prepare(mixed).inputs.mask
    frac = mixed.route_plan.full.num_image / args.tokens
    variants = {
        "dense": lambda: routed_step(model, x, dense_batch, mask),
        "routed": lambda: routed_step(model, x, mixed, mask),
        "select": lambda: select_step(model, x, mixed, mask),
    }
    print(
        f"one layer: hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, "
        f"{args.tokens} tokens ({frac:.0%} image), fp32, {torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {k: [] for k in variants}
    for it in range(args.iters + 1):  # first round is warm-up
        for name, fn in variants.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if it:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<7} fwd+bwd {v * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in times[k])})")
    best = {k: min(v) for k, v in times.items()}
    print(f"ratio routed/dense = {med['routed'] / med['dense']:.3f}   (target <= {TARGET}; routing plan shipped)")
    print(f"ratio select/dense = {med['select'] / med['dense']:.3f}")
    print(f"fastest runs: routed/dense = {best['routed'] / best['dense']:.3f}")


if __name__ == "__main__":
    main()
