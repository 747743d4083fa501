"""The run report of the bundled pipeline: Markdown and HTML pages with sample grids, loss curves and scores.

Loss curves are matplotlib figures with axes and a legend, both models on one plot (log scale with
``log_scale``); the HTML page holds the same content as the Markdown, for a browser.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

SERIES = (("loss", "black"), ("lm_loss", "tab:blue"), ("diffusion_loss", "tab:red"))
STYLES = ("-", "--", ":", "-.")


def _records(metrics_jsonl: Path) -> dict[int, dict]:
    recs: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["step"]] = r  # a resumed run re-logs steps: the last record of each step wins
    return recs


def loss_plot(
    runs: dict[str, str | Path], out_png: str | Path, log_scale: bool = False, title: str = "training losses"
) -> Path:
    """The losses of each run (name -> metrics.jsonl) against the step on one plot: a colour per loss, a line
    style per run; each curve a moving average (window 2% of the steps) over the raw values drawn faintly."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (name, path) in enumerate(runs.items()):
        recs = _records(Path(path))
        steps = sorted(recs)
        for key, color in SERIES:
            xs = [s for s in steps if key in recs[s]]
            ys = np.array([recs[s][key] for s in xs], dtype=float)
            if not len(xs) or (key == "lm_loss" and not ys.any()):  # an editing fine-tune has no LM loss
                continue
            w = max(1, len(xs) // 50)
            smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
            style = STYLES[i % len(STYLES)]
            ax.plot(xs, ys, color=color, alpha=0.15, linewidth=0.6, linestyle=style)
            ax.plot(xs[w - 1 :], smooth, color=color, linewidth=1.6, linestyle=style, label=f"{name} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
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
    loss_plot(
        {"editing fine-tune": run / "llamafusion_edit" / "train" / "metrics.jsonl"},
        rep / "loss_llamafusion_edit.png",
        title="editing fine-tune: target-image loss",
    )
    grid = os.path.relpath(run / "llamafusion_edit" / "samples" / "edits.png", rep)
    return [*lines, "", f"![sources and their edits]({grid})", "", "![editing losses](loss_llamafusion_edit.png)", ""]


def write_report(
    run: str | Path,
    metrics: dict[str, dict],
    stage_seconds: dict[str, float],
    editing: dict | None = None,
    log_scale: bool = False,
) -> Path:
    """run/report/report.md and report.html (+ the loss curves, metrics.json) from a demo run folder.

    ``metrics`` maps a model name to its tools/evaluate.py metrics; model ``m``'s training
    metrics and samples are in run/m/train/metrics.jsonl and run/m/samples. ``editing``: the
    tools/evaluate.py metrics of the editing fine-tune (run/llamafusion_edit), None without one.
    ``log_scale``: the loss curves on a log axis.
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
    loss_plot({n: run / n / "train" / "metrics.jsonl" for n in metrics}, rep / "losses.png", log_scale)
    lines += ["## Training losses", "", "![training losses of every model](losses.png)", ""]
    for name in metrics:
        samples = run / name / "samples"
        lines += [
            f"## {TITLES.get(name, name)}",
            "",
            f"![{name} generated images]({rel(samples / 'images.png')})",
            "",
            f"![{name} captioned images]({rel(samples / 'captions.png')})",
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
    (rep / "report.html").write_text(markdown_to_html(lines, "megafusion run report"))
    return rep / "report.md"


_IMAGE = re.compile(r"^!\[(.*)\]\((.*)\)$")


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def markdown_to_html(lines: list[str], title: str) -> str:
    """The report's Markdown subset (headings, pipe tables, images on their own line, paragraphs) as one
    HTML page; image paths stay relative, so the page sits beside the Markdown and shows the same PNGs."""
    out = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>",
    ]
    table: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # the |---| rule line
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
            table = []
        if not line.strip():
            continue
        level = len(line) - len(line.lstrip("#"))
        image = _IMAGE.match(line.strip())
        if 0 < level <= 6 and line[level : level + 1] == " ":
            out.append(f"<h{level}>{_inline(line[level + 1 :])}</h{level}>")
        elif image:
            out.append(f"<p><img src='{html.escape(image[2])}' alt='{html.escape(image[1])}'></p>")
        else:
            out.append(f"<p>{_inline(line)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
