#!/usr/bin/env python
"""Score a sampled LlamaFusion on the bundled shapes data; write metrics.json.

    python tools/evaluate.py --samples runs/demo/samples --truth runs/demo/held_out/truth.json \\
        --checkpoint runs/demo/llamafusion/train/checkpoints --base-llama runs/demo/base_llama \\
        --out runs/demo/llamafusion/metrics.json

* generation: share of generated images (tools/sample.py --prompts) whose colour, shape and position,
  read from the pixels, match the prompt;
* understanding: share of generated captions (tools/sample.py --images) naming the image's true
  colour, shape and position (--truth: JSON image path -> attributes);
* editing: share of edits (tools/sample.py --edit, records with ``source_attributes``) whose instructed
  attribute has the instructed value while the other two are kept, per edit type;
* language: held-out text perplexity of --base-llama (transformers) and of the trained model's
  text path (--checkpoint); equal for LlamaFusion.
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
    ap.add_argument("--samples", required=True, help="a tools/sample.py output directory")
    ap.add_argument("--truth", help="JSON: image path -> {color, shape, position} for the captioned images")
    ap.add_argument("--checkpoint", help="trained model (checkpoint or export) for the language score")
    ap.add_argument("--base-llama", help="the base HF Llama (with its tokenizer) for the language score")
    ap.add_argument("--texts", type=int, default=200, help="held-out sentences for perplexity")
    ap.add_argument("--out", required=True, help="metrics.json to write")
    args = ap.parse_args(argv)

    from megafusion.demo.evaluation import caption_scores, edit_scores, fusion_perplexity, generation_scores

    if not (Path(args.samples) / "samples.json").is_file():
        print(f"error: {args.samples}: no samples.json (run tools/sample.py first)", file=sys.stderr)
        return 2
    metrics: dict = {"generation": generation_scores(args.samples)}
    editing = edit_scores(args.samples)
    if editing:
        metrics["editing"] = editing
    if args.truth:
        metrics["understanding"] = caption_scores(args.samples, json.loads(Path(args.truth).read_text()))
    if args.base_llama:
        from transformers import AutoTokenizer

        from megafusion.demo.base_lm import perplexity, text_corpus

        texts = text_corpus(args.texts, seed=4242)  # seeds the base Llama was not trained on
        metrics["language"] = {"base_perplexity": perplexity(args.base_llama, args.base_llama, texts)}
        if args.checkpoint:
            from megafusion.api import load_for_inference

            model = load_for_inference(args.checkpoint).model
            tok = AutoTokenizer.from_pretrained(args.base_llama, local_files_only=True)
            metrics["language"]["trained_perplexity"] = fusion_perplexity(model, tok, texts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from megafusion.durable import write_text

    write_text(out, json.dumps(metrics, indent=1))
    fmt = lambda vals: ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items())  # noqa: E731
    for part, vals in metrics.items():
        if part == "editing":
            for kind, v in vals.items():
                print(f"[evaluate] editing {kind}: {fmt(v)}")
        else:
            print(f"[evaluate] {part}: {fmt(vals)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
