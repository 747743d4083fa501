"""The bundled editing set: a shape, an instruction that changes one attribute, the edited shape.

"make it red", "turn it into a square", "move it to the top left": each instruction changes exactly one
of colour, shape and position, so :func:`score_edit` can read the edit back from the pixels (the
shapes checker, :func:`megafusion.demo.shapes.read_attributes`) and call it correct only when the
edited attribute is the instructed one and the other two are those of the source.

Held-out edits: every (source colour, shape, position, edit) combination is assigned to train or
held-out by a fixed hash, about one in ``1 / held_out_fraction``, so the held-out set tests edits of
combinations the model never saw edited (each attribute value and each instruction is seen in training).
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES, draw_shape, read_attributes

ATTRIBUTES = ("color", "shape", "position")


def instruction_for(attribute: str, value: str) -> str:
    if attribute == "color":
        return f"make it {value}"
    if attribute == "shape":
        return f"turn it into a {value}"
    return "move it to the center" if value == "center" else f"move it to the {value}"


def parse_instruction(text: str) -> tuple[str, str] | None:
    """(attribute, value) an instruction asks for, None if it names none (the inverse of instruction_for)."""
    t = " ".join(text.lower().split())
    for value in COLORS:
        if t == f"make it {value}":
            return "color", value
    for value in SHAPES:
        if t == f"turn it into a {value}":
            return "shape", value
    for value in POSITIONS:
        if t in (f"move it to the {value}",):
            return "position", value
    return None


def all_edits() -> list[tuple[dict[str, str], str, str]]:
    """Every (source attributes, edited attribute, new value) with the new value != the source's."""
    values = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
    out = []
    for c in COLORS:
        for s in SHAPES:
            for p in POSITIONS:
                src = {"color": c, "shape": s, "position": p}
                for attr in ATTRIBUTES:
                    out += [(src, attr, v) for v in values[attr] if v != src[attr]]
    return out


def is_held_out(src: dict[str, str], attribute: str, value: str, fraction: float = 0.1) -> bool:
    tag = f"{src['color']}|{src['shape']}|{src['position']}|{attribute}|{value}"
    return zlib.crc32(tag.encode()) % 1000 < int(fraction * 1000)


def edits(split: str, held_out_fraction: float = 0.1) -> list[tuple[dict[str, str], str, str]]:
    """The train or held-out edits (split 'train' / 'held_out')."""
    want = split == "held_out"
    return [e for e in all_edits() if is_held_out(*e, held_out_fraction) == want]


def target_of(src: dict[str, str], attribute: str, value: str) -> dict[str, str]:
    return {**src, attribute: value}


def triples(num: int, split: str = "train", seed: int = 0, size: int = 64, jitter: float = 0.03) -> Iterator[dict]:
    """``num`` webdataset samples ``src.png``, ``tgt.png``, ``txt`` (instruction), ``json``, cycling through the
    split's edits in a shuffled order; source and target share the jitter of the shape's centre."""
    rng = random.Random(seed)
    pool = edits(split)
    order: list = []
    for i in range(num):
        if not order:
            order = pool[:]
            rng.shuffle(order)
        src, attr, value = order.pop()
        tgt = target_of(src, attr, value)
        state = rng.getstate()
        a = draw_shape(src["color"], src["shape"], src["position"], size, jitter, rng)
        rng.setstate(state)  # the same jitter: only the instructed attribute differs
        b = draw_shape(tgt["color"], tgt["shape"], tgt["position"], size, jitter, rng)
        sample = {"__key__": f"{seed:04d}{i:08d}", "txt": instruction_for(attr, value)}
        for name, img in (("src.png", a), ("tgt.png", b)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sample[name] = buf.getvalue()
        sample["json"] = json.dumps({"source": src, "target": tgt, "attribute": attr, "value": value})
        yield sample


def write_edit_shards(
    out_dir: str | Path, num: int, shard_size: int = 256, split: str = "train", seed: int = 0, size: int = 64
) -> list[Path]:
    """Write ``num`` triples as ``edits-000000.tar`` ... webdataset shards; returns their paths."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    for i, sample in enumerate(triples(num, split, seed, size)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            paths.append(out_dir / f"edits-{i // shard_size:06d}.tar")
            writer = wds.TarWriter(str(paths[-1]))
        writer.write(sample)
    if writer is not None:
        writer.close()
    return paths


def score_edit(source: dict[str, str], instruction: str, edited_image) -> dict[str, bool]:
    """Is the edit right? ``edited`` (the instructed attribute now has the instructed value), ``kept`` (the
    other two are the source's) and ``correct`` (both), read from the pixels."""
    asked = parse_instruction(instruction)
    if asked is None:
        raise ValueError(f"not an editing instruction of the shapes set: {instruction!r}")
    attr, value = asked
    got = read_attributes(edited_image)
    edited = got[attr] == value
    kept = all(got[a] == source[a] for a in ATTRIBUTES if a != attr)
    return {"edited": edited, "kept": kept, "correct": edited and kept}
