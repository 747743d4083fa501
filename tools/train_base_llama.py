#!/usr/bin/env python
"""Pretrain the small text-only base Llama of the bundled pipeline (Hugging Face format).

    python tools/train_base_llama.py --tokenizer runs/demo/tokenizer --out runs/demo/base_llama --config tiny

Trains a LlamaForCausalLM with the config's model dimensions on sentences about coloured
shapes (the bundled tokenizer's words), saves it with save_pretrained (plus the tokenizer),
and prints its held-out perplexity. The result is what tools/convert_hf_llama.py and
checkpoint.hf_llama take, like any HF Llama.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--config", default="tiny", help="preset/YAML whose model dimensions to use")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from megafusion.config import ConfigError, load_config
    from megafusion.demo.base_lm import train_base_llama

    try:
        cfg = load_config(args.config, args.overrides)
        info = train_base_llama(
            args.out, args.tokenizer, cfg.model, args.steps, args.batch_size, args.seq_length, args.lr, args.seed
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(args.out) / "training.json").write_text(json.dumps({**info, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
