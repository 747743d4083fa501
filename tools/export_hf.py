#!/usr/bin/env python
"""Export a megafusion training checkpoint to a Hugging Face directory plus the image side.

    python tools/export_hf.py --in runs/demo/llamafusion/train/checkpoints/latest --out exported/

`transformers.LlamaForCausalLM.from_pretrained(OUT)` loads the text tower (bit-identical to the
base Llama: it never trains); `LlamaFusion.from_pretrained(OUT)` loads everything back, at any TP.
`--in` may be a checkpoint folder or a checkpoints directory with a `latest` pointer.
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
    ap.add_argument("--in", dest="inp", required=True, help="checkpoint folder (or its parent with `latest`)")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    args = ap.parse_args(argv)

    from megafusion.checkpoint.export import export_checkpoint
    from megafusion.checkpoint.files import CheckpointError, latest_checkpoint

    src = Path(args.inp)
    if src.name == "latest" and src.is_file():
        src = src.parent
    if not (src / "meta.json").is_file():
        resolved = latest_checkpoint(src)
        if resolved is None:
            print(
                f"error: {args.inp} is neither a checkpoint folder nor a directory with a `latest` pointer",
                file=sys.stderr,
            )
            return 1
        src = resolved
    try:
        export_checkpoint(src, args.out)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
