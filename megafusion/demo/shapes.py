"""The bundled tiny dataset: coloured shapes at positions, with captions a program can check.

"a red circle at the top left": every attribute of the caption can be read back
from the pixels by :func:`read_attributes`, which knows nothing about any model,
so generated images and generated captions can be scored automatically.

Images are drawn on a light background, one shape per image, filling about a
third of the side, centred in one of five regions.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre of the shape as a fraction of the side
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
BACKGROUND = (245, 245, 240)


def caption_for(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} at the {position}" if position != "center" else f"a {color} {shape} in the center"


def parse_caption(text: str) -> dict[str, str]:
    """Colour, shape and position named in a caption ("none" where it names none, or several).

    The inverse of :func:`caption_for` on well-formed captions, and a fair reader of
    generated ones: each attribute counts only if exactly one value of it is named.
    """
    words = text.lower().replace(".", " ").split()
    joined = " ".join(words)

    def one(options) -> str:
        found = [o for o in options if f" {o} " in f" {joined} "]
        if len(found) > 1:  # "top left" also contains no other option; "center" vs corners are disjoint
            found = [o for o in found if not any(o != f and o in f for f in found)]
        return found[0] if len(found) == 1 else "none"

    return {"color": one(COLORS), "shape": one(SHAPES), "position": one(POSITIONS)}


def draw_shape(
    color: str, shape: str, position: str, size: int = 64, jitter: float = 0.0, rng: random.Random | None = None
) -> Image.Image:
    """One RGB image of ``size`` x ``size`` pixels."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx = (cx + rng.uniform(-jitter, jitter)) * size
    cy = (cy + rng.uniform(-jitter, jitter)) * size
    r = size * 0.17
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img


def read_attributes(image: Image.Image | np.ndarray) -> dict[str, str]:
    """Colour, shape and position read from the pixels (nearest palette colour, fill ratio, centroid)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    bg = np.array(BACKGROUND, dtype=np.float32)
    fg = np.abs(arr - bg).sum(-1) > 60  # [H, W] shape pixels
    if fg.sum() < 4:
        return {"color": "none", "shape": "none", "position": "none"}
    mean = arr[fg].mean(0)
    color = min(COLORS, key=lambda c: float(((np.array(COLORS[c]) - mean) ** 2).sum()))
    ys, xs = np.nonzero(fg)
    h, w = fg.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = fg.sum() / box_area  # square ~1.0, circle ~0.79, triangle ~0.5
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
    return {"color": color, "shape": shape, "position": position}


def samples(num: int, seed: int = 0, size: int = 64, jitter: float = 0.03) -> Iterator[dict]:
    """``num`` samples cycling through every (colour, shape, position), shuffled, with small jitter."""
    rng = random.Random(seed)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    order: list = []
    for i in range(num):
        if not order:
            order = combos[:]
            rng.shuffle(order)
        color, shape, position = order.pop()
        img = draw_shape(color, shape, position, size, jitter, rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        yield {
            "__key__": f"{seed:04d}{i:08d}",
            "png": buf.getvalue(),
            "txt": caption_for(color, shape, position),
            "json": json.dumps({"color": color, "shape": shape, "position": position, "width": size, "height": size}),
        }


def write_shards(out_dir: str | Path, num: int, shard_size: int = 256, seed: int = 0, size: int = 64) -> list[Path]:
    """Write ``num`` samples as ``shapes-000000.tar`` ... webdataset shards; returns their paths."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    for i, sample in enumerate(samples(num, seed, size)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            path = out_dir / f"shapes-{i // shard_size:06d}.tar"
            paths.append(path)
            writer = wds.TarWriter(str(path))
        writer.write(sample)
    if writer is not None:
        writer.close()
    return paths
