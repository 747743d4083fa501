#!/usr/bin/env python
"""Convert a Hugging Face Llama directory into a megafusion training checkpoint at a TP x PP layout.

    python tools/convert_hf_llama.py --hf-dir /models/Meta-Llama-3.1-8B --out ckpt/8b_tp8 --tp 8 --pp 1 \\
        --config llama3-8b-fusion
    python -m launcher.train --config llama3-8b-fusion checkpoint.hf_llama=/models/Meta-Llama-3.1-8B \\
        checkpoint.load=ckpt/8b_tp8

The model dims (hidden size, layers, heads, vocab, RoPE, tied embeddings) always come from
--hf-dir's config.json: --config supplies the image side, seed and the rest, and its preset dims
are replaced (the tool says which). A model dim given as an override must agree with the HF
model, or the tool stops naming both values. The written config.yaml describes the weights and
the layout: pass it back as ``launcher.train --config OUT/config.yaml``.

The image tower starts as copies of the Llama weights, the U-Nets from the config's seed; the
frozen text tower stays in --hf-dir (recorded by fingerprint). Streams one output shard at a time.

--hf-dir may be a LLaVA (``LlavaForConditionalGeneration``, CLIP vision tower): its language model
converts like a Llama, and its vision tower and projector stay frozen in --hf-dir with the text
tower (LLaVA-Fusion; pick model.boi_token_id / model.eoi_token_id apart from its <image> id).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF Llama or LLaVA directory (safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    ap.add_argument("--config", default="llama3-8b-fusion", help="preset/YAML giving the image side and seed")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    args = ap.parse_args(argv)

    from megafusion.checkpoint.convert import convert_hf_llama
    from megafusion.checkpoint.hf_import import HFCheckpointError
    from megafusion.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        explicit = [o.split("=", 1)[0].strip() for o in args.overrides]  # model dims set here must match the HF model
        out = convert_hf_llama(
            args.hf_dir, args.out, cfg, args.tp, args.pp, args.vpp, explicit=explicit, log=lambda s: print(s)
        )
    except (ConfigError, HFCheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} (TP={args.tp} PP={args.pp}{f' VPP={args.vpp}' if args.vpp else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
