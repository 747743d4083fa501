"""The run report of the bundled pipeline: a Markdown page with sample grids, loss curves and scores.

Plots are drawn with PIL (already a dependency) so the report needs nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = (("loss", (30, 30, 30)), ("lm_loss", (40, 80, 220)), ("diffusion_loss", (220, 40, 40)))


def loss_plot(metrics_jsonl: str | Path, out_png: str | Path, width: int = 640, height: int = 360) -> Path:
    """Training losses per step (last record of each step wins), one line per series, min/max on the axis."""
    recs: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r
    steps = sorted(recs)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    d.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    values = [recs[s][k] for s in steps for k, _ in SERIES if k in recs[s]]
    if steps and values:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0

        def xy(step: int, v: float) -> tuple[float, float]:
            fx = (step - steps[0]) / max(1, steps[-1] - steps[0])
            return left + fx * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top)

        for i, (key, color) in enumerate(SERIES):
            pts = [xy(s, recs[s][key]) for s in steps if key in recs[s]]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            d.text((left + 10 + 150 * i, bottom + 18), key, fill=color)
        d.text((4, top), f"{hi:.2f}", fill="black")
        d.text((4, bottom - 10), f"{lo:.2f}", fill="black")
        d.text((left, bottom + 4), f"step {steps[0]}", fill="black")
        d.text((right - 70, bottom + 4), f"step {steps[-1]}", fill="black")
    img.save(out_png)
    return Path(out_png)


def _table(metrics: dict, part: str, keys=("color", "shape", "position", "all", "n")) -> str:
    vals = metrics.get(part, {})
    if not vals:
        return ""
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "| " + " | ".join(f"{vals[k]:.3f}" if isinstance(vals.get(k), float) else str(vals.get(k, ""))
                                    for k in keys) + " |\n"


def write_report(run: str | Path, metrics: dict, stage_seconds: dict[str, float]) -> Path:
    """run/report/report.md (+ loss.png, metrics.json) from a demo run folder."""
    run = Path(run)
    rep = run / "report"
    rep.mkdir(parents=True, exist_ok=True)
    loss_plot(run / "train" / "metrics.jsonl", rep / "loss.png")
    (rep / "metrics.json").write_text(json.dumps({**metrics, "stage_seconds": stage_seconds}, indent=1))
    rel = lambda p: os.path.relpath(p, rep)  # noqa: E731
    lang = metrics.get("language", {})
    lines = [
        "# megafusion run report", "",
        f"Run folder `{run}`.", "",
        "## Generation (images from captions; attributes read from the pixels)", "",
        _table(metrics, "generation"),
        f"![generated images]({rel(run / 'samples' / 'images.png')})", "",
        "## Understanding (captions of images; attributes parsed from the text)", "",
        _table(metrics, "understanding"),
        f"![captioned images]({rel(run / 'samples' / 'captions.png')})", "",
        "## Language (held-out text perplexity)", "",
        f"base Llama {lang.get('base_perplexity', float('nan')):.6f}, trained model "
        f"{lang.get('trained_perplexity', float('nan')):.6f}", "",
        "## Training", "",
        "![losses](loss.png)", "",
        "## Stage times (s)", "",
        "| " + " | ".join(stage_seconds) + " |", "|" + "---|" * len(stage_seconds),
        "| " + " | ".join(f"{v:.1f}" for v in stage_seconds.values()) + " |", "",
    ]
    (rep / "report.md").write_text("\n".join(lines))
    return rep / "report.md"
