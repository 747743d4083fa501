"""The pictures of LLaVA-Fusion understanding pairs: how the loader reads and normalises them.

A latent shard's sample may carry its picture (``KEY.pixels.npy``, uint8 [3, P, P], written by
``tools/precompute_latents.py --keep-pixels P``). With ``data.vlm_understanding`` the loader lays an
image-first pair out the VLM's way and hands the picture to the frozen CLIP tower, normalised as the
LLaVA's image processor does (``image_mean`` / ``image_std`` of its ``preprocessor_config.json``,
CLIP's values when the directory has none). The shard stores the cropped, resized picture, so the
loader only rescales and normalises.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megafusion.checkpoint.hf_import import read_hf_config, vision_spec_from_hf
from megafusion.config.schema import Config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXELS_EXT = "pixels.npy"


class BadPicture(ValueError):
    """A sample's stored picture cannot be read (the loader skips the sample and counts it)."""


@dataclass(frozen=True)
class VlmPictures:
    """What the loader needs of the LLaVA: its placeholder id, how many it fills, the picture size and norm."""

    image_token_id: int
    placeholders: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalise(self, pixels: np.ndarray, key: str) -> np.ndarray:
        """uint8 [3, S, S] -> float32 [3, S, S] as the LLaVA's processor gives it."""
        want = (3, self.image_size, self.image_size)
        if tuple(pixels.shape) != want:
            raise ValueError(
                f"{key}: stored picture of shape {tuple(pixels.shape)}, the LLaVA's vision tower reads {want} "
                f"(rerun tools/precompute_latents.py with --keep-pixels {self.image_size})"
            )
        x = pixels.astype(np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (x - mean) / std


def vlm_pictures(cfg: Config) -> VlmPictures | None:
    """The run's picture handling (None unless ``data.vlm_understanding``); a clear error if the base is no LLaVA."""
    if not cfg.data.vlm_understanding:
        return None
    if not cfg.checkpoint.hf_llama:
        raise ValueError("data.vlm_understanding=true needs checkpoint.hf_llama (the LLaVA directory)")
    hf_dir = Path(cfg.checkpoint.hf_llama)
    spec = vision_spec_from_hf(read_hf_config(hf_dir))
    if spec is None:
        raise ValueError(
            f"data.vlm_understanding=true needs checkpoint.hf_llama to be a LLaVA directory; "
            f"{hf_dir / 'config.json'} describes a text-only model"
        )
    proc = hf_dir / "preprocessor_config.json"
    pre = json.loads(proc.read_text()) if proc.is_file() else {}
    mean, std = tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{proc}: image_mean / image_std must have 3 values, got {mean} / {std}")
    return VlmPictures(spec.image_token_id, spec.tokens_per_image, spec.image_size, mean, std)


def read_pixels(parts: dict[str, bytes]) -> np.ndarray | None:
    """A sample's stored picture (numpy, never unpickled), or None if it has none."""
    data = parts.get(PIXELS_EXT)
    if data is None:
        return None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise BadPicture(f"unreadable {PIXELS_EXT}: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.dtype != np.uint8:
        raise BadPicture(f"{PIXELS_EXT} must be uint8 [3, H, W]")
    return arr
