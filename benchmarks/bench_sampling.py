"""Sampling speed: text decoding with the preallocated KV cache vs the old concatenating one, and image
sampling with the text prefix's keys/values cached across denoising steps vs recomputing the sequence.

    python benchmarks/bench_sampling.py [--only decode|images]
        [--decode-hidden 256] [--decode-layers 4] [--decode-batch 16] [--cached 512] [--new-tokens 32]
        [--hidden 512] [--layers 8] [--steps 10] [--prompts 64 256]

Both side by side in one run, one process, fp32 CPU.

Text decoding (``--decode-*``): a batch of prompts of ``--cached`` tokens is prefilled, then
``--new-tokens`` greedy tokens are decoded one forward each, timed without the prefill, the two
caches in lockstep (each token's forward on one, then on the other) so both see the same load:
  prealloc : megafusion.model.kv_cache.KVCache, buffers of max_len written in place
  concat   : _ConcatKVCache below, a copy of the cache before it was preallocated
             (torch.cat of the whole past in every layer at every token), kept as the baseline
Prints decoded tokens/s (batch x tokens / s) of each and the ratio prealloc/concat; the
target is >= 1.3 at 512 cached tokens. The model is narrow and the batch wide so that the
cache, not the weights, is what a decode step mostly moves (a layer's weights are ~12 h^2
floats, its cache b x s x 2 x hkv x d).

Image sampling: 256 image tokens (128 px images, VAE factor 4, patch 2), batch of 2 prompts, DDIM:
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


class _ConcatKVCache:
    """BASELINE ONLY: the KV cache as it was before preallocation, copied here to time against.

    Every forward concatenates the whole cached past with the new keys/values, in every
    layer, so decoding n tokens copies O(n * s) per layer and allocates anew each time.
    Same interface as ``megafusion.model.kv_cache.KVCache`` (the part forward_cached uses).
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.document_ids: torch.Tensor | None = None  # [b, s_past]
        self.image_ids: torch.Tensor | None = None
        self.frozen = False

    @property
    def length(self) -> int:
        return 0 if self.document_ids is None else self.document_ids.shape[1]

    def extend(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_id in self.keys:
            k = torch.cat([self.keys[layer_id], k], dim=2)  # [b, hkv, s_past + s, d], a fresh copy
            v = torch.cat([self.values[layer_id], v], dim=2)
        if not self.frozen:
            self.keys[layer_id], self.values[layer_id] = k, v
        return k, v

    def key_ids(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.document_ids is None:
            return document_ids, image_ids
        return torch.cat([self.document_ids, document_ids], 1), torch.cat([self.image_ids, image_ids], 1)

    def commit(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> None:
        if not self.frozen:
            self.document_ids, self.image_ids = self.key_ids(document_ids, image_ids)


def _model(hidden: int, layers: int, kv_heads: int):
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
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=hidden // 64,
        num_kv_heads=kv_heads,
        ffn_hidden_size=int(hidden * 2.75),
        boi_token_id=4094,
        eoi_token_id=4095,
        image=image,
        max_position_embeddings=4096,
    )
    model = LlamaFusion(cfg)
    model.init_random_text_tower()
    model.init_image_tower_from_text()
    return model.eval(), image


@torch.no_grad()
def _decode_lockstep(model, caches: dict, prompt: torch.Tensor, new_tokens: int) -> tuple[dict, dict]:
    """Prefill ``prompt`` [b, s] into each cache, then decode ``new_tokens`` greedy tokens with all of them in
    lockstep, timing each one-token forward -> (seconds per cache, tokens [b, n] per cache).

    Lockstep (alternating which cache goes first) so that both see the same load on a shared machine.
    """
    from megafusion.model.batch import FusionBatch

    b, s = prompt.shape
    logits = {name: model.forward_cached(FusionBatch.text_only(prompt), c)[0] for name, c in caches.items()}
    seconds = dict.fromkeys(caches, 0.0)
    toks: dict[str, list[torch.Tensor]] = {name: [] for name in caches}
    names = list(caches)
    for i in range(new_tokens):
        for name in names if i % 2 == 0 else names[::-1]:
            tok = logits[name].argmax(-1)  # [b]
            toks[name].append(tok)
            step = FusionBatch(
                input_ids=tok[:, None],
                image_ids=torch.full((b, 1), -1),
                position_ids=torch.full((b, 1), s + i),
                document_ids=torch.zeros(b, 1, dtype=torch.long),
            )
            t0 = time.perf_counter()
            logits[name], _ = model.forward_cached(step, caches[name])
            seconds[name] += time.perf_counter() - t0
    return seconds, {name: torch.stack(t, 1) for name, t in toks.items()}


def bench_decode(args: argparse.Namespace) -> None:
    from megafusion.model.kv_cache import KVCache

    h = args.decode_hidden
    model, _ = _model(h, args.decode_layers, kv_heads=h // 128)
    b, s, n = args.decode_batch, args.cached, args.new_tokens
    print(
        f"[bench] text decoding: {args.decode_layers} layers x {h} hidden ({h // 64} heads, {h // 128} KV heads), "
        f"batch {b}, {s} cached tokens, {n} new tokens, {torch.get_num_threads()} threads"
    )
    prompt = torch.randint(3, 4000, (b, s), generator=torch.Generator().manual_seed(0))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        caches = {
            "prealloc": KVCache(b, max_len=s + n),
            "concat": _ConcatKVCache(b),  # baseline: the old cat-based cache
        }
        seconds, tokens = _decode_lockstep(model, caches, prompt, n)
        if not torch.equal(tokens["prealloc"], tokens["concat"]):
            raise SystemExit("prealloc and concat caches decoded different tokens")
        for name, dt in seconds.items():
            best[name] = min(best.get(name, float("inf")), dt)
    pre, cat = b * n / best["prealloc"], b * n / best["concat"]
    print(
        f"decode at {s} cached tokens: prealloc {pre:8.1f} tokens/s, concat (old) {cat:8.1f} tokens/s, "
        f"ratio prealloc/concat = {pre / cat:.2f}  (target >= 1.3; same tokens decoded)"
    )


def bench_images(args: argparse.Namespace) -> None:
    model, image = _model(args.hidden, args.layers, kv_heads=args.hidden // 128)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("decode", "images"), default=None, help="run one of the two benchmarks")
    ap.add_argument("--decode-hidden", type=int, default=256)
    ap.add_argument("--decode-layers", type=int, default=4)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--cached", type=int, default=512, help="prompt tokens in the cache before decoding")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.only in (None, "decode"):
        bench_decode(args)
    if args.only in (None, "images"):
        bench_images(args)


if __name__ == "__main__":
    main()
