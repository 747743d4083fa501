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


TITLES = {
    "llamafusion": "LlamaFusion (frozen text tower, trainable image tower)",
    "transfusion": "Transfusion-style baseline (one tower, every weight trained)",
}
ROWS = [(part, key) for part in ("generation", "understanding") for key in ("color", "shape", "position", "all")]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _comparison(metrics: dict[str, dict]) -> list[str]:
    """One table, a column per model: generation / understanding shares and text perplexity."""
    names = list(metrics)
    lines = ["| score | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for part, key in ROWS:
        n = next((m[part]["n"] for m in metrics.values() if m.get(part)), "")
        lines.append(
            f"| {part} {key} (n={n}) | " + " | ".join(_fmt(metrics[m].get(part, {}).get(key)) for m in names) + " |"
        )
    base = next((m["language"]["base_perplexity"] for m in metrics.values() if "language" in m), None)
    lines.append(
        f"| text perplexity (base Llama {'-' if base is None else f'{base:.6f}'}) | "
        + " | ".join(
            f"{metrics[m]['language']['trained_perplexity']:.6f}"
            if "trained_perplexity" in metrics[m].get("language", {})
            else "-"
            for m in names
        )
        + " |"
    )
    return lines


def _editing(run: Path, rep: Path, editing: dict) -> list[str]:
    """The editing section: scores per edit type, the source/edit grid and the fine-tune's losses."""
    scores = editing.get("editing", {})
    lines = [
        "## Image editing (LlamaFusion fine-tuned on the bundled editing set)",
        "",
        "Every held-out edit (a source combination and instruction the fine-tune never saw edited) once. "
        "Correct: the instructed attribute has the instructed value and the other two are the source's, "
        "read from the pixels.",
        "",
        "| edit type | n | correct | edited attribute right | other two kept |",
        "|---|---|---|---|---|",
    ]
    for kind, v in scores.items():
        lines.append(f"| {kind} | {v['n']} | {v['correct']:.3f} | {v['edited']:.3f} | {v['kept']:.3f} |")
    loss_plot(run / "llamafusion_edit" / "train" / "metrics.jsonl", rep / "loss_llamafusion_edit.png")
    grid = os.path.relpath(run / "llamafusion_edit" / "samples" / "edits.png", rep)
    return [*lines, "", f"![sources and their edits]({grid})", "", "![editing losses](loss_llamafusion_edit.png)", ""]


def write_report(
    run: str | Path, metrics: dict[str, dict], stage_seconds: dict[str, float], editing: dict | None = None
) -> Path:
    """run/report/report.md (+ a loss plot per model, metrics.json) from a demo run folder.

    ``metrics`` maps a model name to its tools/evaluate.py metrics; model ``m``'s training
    metrics and samples are in run/m/train/metrics.jsonl and run/m/samples. ``editing``: the
    tools/evaluate.py metrics of the editing fine-tune (run/llamafusion_edit), None without one.
    """
    run = Path(run)
    rep = run / "report"
    rep.mkdir(parents=True, exist_ok=True)
    extra = {} if editing is None else {"llamafusion_edit": editing}
    (rep / "metrics.json").write_text(json.dumps({**metrics, **extra, "stage_seconds": stage_seconds}, indent=1))
    rel = lambda p: os.path.relpath(p, rep)  # noqa: E731
    lines = [
        "# megafusion run report",
        "",
        f"Run folder `{run}`. Generation: an image drawn for each caption (every colour x shape x position at "
        "60 samples), attributes read from the pixels. Understanding: captions of freshly drawn images, "
        "attributes parsed from the text. Language: held-out text perplexity (the base Llama's is kept exactly "
        "by a frozen text tower).",
        "",
        "## Scores",
        "",
        *_comparison(metrics),
        "",
    ]
    for name in metrics:
        loss_plot(run / name / "train" / "metrics.jsonl", rep / f"loss_{name}.png")
        samples = run / name / "samples"
        lines += [
            f"## {TITLES.get(name, name)}",
            "",
            f"![{name} generated images]({rel(samples / 'images.png')})",
            "",
            f"![{name} captioned images]({rel(samples / 'captions.png')})",
            "",
            f"![{name} losses](loss_{name}.png)",
            "",
        ]
    if editing is not None:
        lines += _editing(run, rep, editing)
    lines += [
        "## Stage times (s)",
        "",
        "| " + " | ".join(stage_seconds) + " |",
        "|" + "---|" * len(stage_seconds),
        "| " + " | ".join(f"{v:.1f}" for v in stage_seconds.values()) + " |",
        "",
        f"Total {sum(stage_seconds.values()):.0f} s.",
        "",
    ]
    (rep / "report.md").write_text("\n".join(lines))
    return rep / "report.md"
