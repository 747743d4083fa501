"""Automatic scores of the bundled pipeline, from pixels and text only (no model inside the checker).

* generation: a generated image is read with ``shapes.read_attributes`` and compared
  with the attributes its prompt names (``shapes.parse_caption``);
* understanding: a generated caption is parsed and compared with the image's true attributes;
* editing: an edited image (tools/sample.py --edit) is correct when its instructed attribute has the
  instructed value and the other two are the source's (``shape_edits.score_edit``), per edit type;
* language: perplexity on held-out text, of the base HF Llama and of the trained model's
  text path (``LlamaFusion.text_logits``): equal for LlamaFusion, whose text tower is frozen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from megafusion.demo.shapes import parse_caption, read_attributes

ATTRS = ("color", "shape", "position")


def _shares(pairs: Iterable[tuple[dict, dict]]) -> dict[str, float]:
    pairs = list(pairs)
    if not pairs:
        return {}
    out = {k: sum(got[k] == want[k] for got, want in pairs) / len(pairs) for k in ATTRS}
    out["all"] = sum(all(got[k] == want[k] for k in ATTRS) for got, want in pairs) / len(pairs)
    out["n"] = len(pairs)
    return out


def generation_scores(samples_dir: str | Path) -> dict[str, float]:
    """Shares of tools/sample.py images whose colour / shape / position match their prompt."""
    from PIL import Image

    d = Path(samples_dir)
    rec = json.loads((d / "samples.json").read_text())
    pairs = [
        (read_attributes(Image.open(d / f"image_{r['index']:03d}.png")), parse_caption(r["prompt"]))
        for r in rec["images"]
    ]
    return _shares(pairs)


def caption_scores(samples_dir: str | Path, truth: dict[str, dict]) -> dict[str, float]:
    """Shares of tools/sample.py captions naming the right colour / shape / position (truth: image path -> attrs)."""
    rec = json.loads((Path(samples_dir) / "samples.json").read_text())
    missing = [r["image"] for r in rec["captions"] if r["image"] not in truth]
    if missing:
        raise ValueError(f"no true attributes for {missing[:3]} in the truth file")
    return _shares((parse_caption(r["caption"]), truth[r["image"]]) for r in rec["captions"])


def edit_scores(samples_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per edit type (colour, shape, position) and over all: shares of tools/sample.py edits that are correct,
    that changed the instructed attribute (``edited``) and that kept the other two (``kept``).

    Each edit record needs the source's attributes (``source_attributes``, as launcher.demo writes them);
    records without them are not scored.
    """
    from PIL import Image

    from megafusion.demo.shape_edits import ATTRIBUTES, parse_instruction, score_edit

    d = Path(samples_dir)
    rec = json.loads((d / "samples.json").read_text())
    scored = [
        (
            parse_instruction(r["instruction"]),
            score_edit(r["source_attributes"], r["instruction"], Image.open(d / r["file"])),
        )
        for r in rec.get("edits", [])
        if "source_attributes" in r
    ]
    out: dict[str, dict[str, float]] = {}
    for kind in (*ATTRIBUTES, "all"):
        part = [s for asked, s in scored if kind == "all" or (asked and asked[0] == kind)]
        if part:
            out[kind] = {k: sum(s[k] for s in part) / len(part) for k in ("correct", "edited", "kept")}
            out[kind]["n"] = len(part)
    return out


def fusion_perplexity(model, tokenizer, texts: list[str]) -> float:
    """Perplexity of a LlamaFusion's text path (text-only input) on texts, each <s> text </s>."""
    from megafusion.demo.base_lm import sequence_perplexity

    return sequence_perplexity(model.text_logits, tokenizer, texts)
