"""Aspect-ratio buckets: the fixed set of image shapes a run trains and samples at.

A bucket is a pixel size ``(H, W)``. Every bucket of a run holds about the same number of
image tokens as the square ``image_size`` image, so a packed row's length and a step's cost
do not depend on which buckets its images came from (SDXL and BAGEL bucket the same way).
``model.image.buckets`` names them as ``"HxW,HxW,..."``; '' means the square only.
"""

from __future__ import annotations

import math


def parse_buckets(spec: str, key: str = "model.image.buckets") -> list[tuple[int, int]]:
    """``"256x256, 224x288"`` -> ``[(256, 256), (224, 288)]`` (order kept, duplicates dropped); a malformed
    entry is a ValueError naming ``key`` and the entry."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        h, sep, w = part.lower().partition("x")
        if not sep or not h.strip().isdigit() or not w.strip().isdigit() or int(h) < 1 or int(w) < 1:
            raise ValueError(f"{key}={spec!r}: entry {part!r} is not a pixel size HxW (e.g. 256x256)")
        size = (int(h), int(w))
        if size not in out:
            out.append(size)
    return out


def format_buckets(sizes: list[tuple[int, int]]) -> str:
    """The inverse of :func:`parse_buckets`."""
    return ",".join(f"{h}x{w}" for h, w in sizes)


def image_sizes(image_cfg) -> list[tuple[int, int]]:
    """The pixel sizes ``(H, W)`` a run's images may have: its buckets, or the square ``image_size``."""
    return parse_buckets(image_cfg.buckets) or [(image_cfg.image_size, image_cfg.image_size)]


def default_buckets(
    resolution: int, multiple: int, max_aspect: float = 2.0, tolerance: float = 0.1
) -> list[tuple[int, int]]:
    """Pixel sizes with sides a multiple of ``multiple`` (vae_downsample x patch_size), area within
    ``tolerance`` of ``resolution**2`` and aspect ratio at most ``max_aspect``: the square first, then
    landscape/portrait pairs from the squarest out. For 256 px and multiple 16: 256x256, 240x272, 272x240, ..."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
    area = resolution * resolution
    sizes = [(resolution, resolution)]
    for h in range(resolution - multiple, 0, -multiple):
        w = round(area / h / multiple) * multiple
        if w / h > max_aspect:
            break
        if abs(h * w - area) <= tolerance * area and (h, w) not in sizes:
            sizes += [(h, w), (w, h)]
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket ``(H, W)`` whose aspect ratio is closest to the image's (in log ratio, so 1:2 and 2:1 are
    equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))
