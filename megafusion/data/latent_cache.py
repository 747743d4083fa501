"""Offline VAE-latent caching: image-caption webdataset shards -> latent shards, on Ray.

One input shard is one unit of work and produces exactly one output shard,
``latents-NNNNNN.tar``, written to a temporary name and renamed when complete;
its completion record ``latents-NNNNNN.tar.done.json`` (the counts) is written
last. A rerun skips shards with a record and redoes any other, so a worker that
dies mid-shard loses nothing and duplicates nothing.

Shards are read with ``tarfile`` and decoded by explicit handlers only (PIL
for images, UTF-8 for captions, ``json.loads`` for metadata): nothing read from
a shard is ever unpickled. Output samples hold ``npy`` (float16 latent
[C, h, w], ``numpy.save`` format, loaded with ``allow_pickle=False``), ``txt``
(caption) and ``json`` (source shard, key and image size).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megafusion.durable import publish, temp_sibling, write_text

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MAX_MEMBER_BYTES = 256 * 2**20
SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "corrupt_image",
    "truncated_image",
    "too_small",
    "decompression_bomb",
    "truncated_shard",
    "oversized_member",
)


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class CacheOptions:
    resolution: int = 256
    batch_size: int = 16
    min_size: int = 16
    """Images whose shorter side is below this many pixels are skipped (too_small)."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are skipped unread (decompression_bomb)."""
    sample: bool = False
    """Sample the latent distribution (seeded per sample) instead of taking its mode."""
    seed: int = 0
    edit: bool = False
    """Editing triples: each input sample holds ``src.<img>``, ``tgt.<img>`` and ``txt`` (the instruction); both
    images are encoded and written as ``src.npy`` / ``tgt.npy`` beside ``txt`` (``data/loader.py`` reads them)."""
    keep_pixels: int = 0
    """> 0: also store the picture, center-cropped and resized to this many pixels, as ``KEY.pixels.npy``
    (uint8 [3, P, P]) for a LLaVA's vision tower (LLaVA-Fusion understanding pairs, ``data.vlm_understanding``)."""


def expand_inputs(pattern: str) -> list[str]:
    """Brace patterns (``shard-{000000..000127}.tar``), globs and fsspec URLs -> sorted shard list."""
    import fsspec
    from braceexpand import braceexpand

    urls: list[str] = []
    for part in braceexpand(pattern):
        if "://" in part and not part.startswith("file://"):  # remote: check and expand with fsspec
            fs, path = fsspec.core.url_to_fs(part)
            proto = part.split("://", 1)[0]
            if any(ch in path for ch in "*?["):
                urls.extend(f"{proto}://{p.split('://', 1)[-1]}" for p in sorted(fs.glob(path)))
            elif fs.exists(path):
                urls.append(part)
            else:
                raise FileNotFoundError(f"--input {pattern!r}: shard {part!r} does not exist")
            continue
        local = part[len("file://") :] if part.startswith("file://") else part
        if os.path.isdir(local):  # a directory means its shards
            urls.extend(sorted(glob.glob(os.path.join(local, "*.tar"))))
        elif any(ch in local for ch in "*?["):
            urls.extend(sorted(glob.glob(local)))
        elif os.path.exists(local):
            urls.append(local)
        else:
            raise FileNotFoundError(f"--input {pattern!r}: shard {local!r} does not exist")
    if not urls:
        raise FileNotFoundError(f"--input {pattern!r} matches no shard")
    return urls


def iter_tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in archive order; raises BadSample('truncated_shard') on a cut archive."""
    import fsspec

    current, parts = None, {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower()
                if member.size > MAX_MEMBER_BYTES:  # never read a huge member into memory
                    data = b""
                    ext = "oversized_" + ext
                else:
                    data = tar.extractfile(member).read()
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                parts[ext] = data
    except (tarfile.ReadError, EOFError) as exc:  # a cut archive; I/O errors propagate and the shard is redone
        if current is not None:
            yield current, parts
        raise BadSample("truncated_shard") from exc
    if current is not None:
        yield current, parts


def decode_image(data: bytes, opts: CacheOptions):
    """PIL image in RGB, or BadSample naming why not. The size is checked before pixels are decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > opts.max_pixels:
                raise BadSample("decompression_bomb")
            im.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("decompression_bomb") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadSample("truncated_image" if "truncated" in str(exc).lower() else "corrupt_image") from None
    if min(im.size) < opts.min_size:
        raise BadSample("too_small")
    return im.convert("RGB")


def square_pixels(im, resolution: int) -> np.ndarray:
    """Center-crop to a square and resize (bicubic) to ``resolution``: uint8 [3, R, R] (the stored picture)."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))  # [R, R, 3] -> [3, R, R]


def preprocess(im, resolution: int) -> torch.Tensor:
    """Center-crop to a square, resize (bicubic) to ``resolution``, scale to [-1, 1]: [3, R, R] float32."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # [R, R, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, R, R]


def load_vae(vae_dir: str, device: torch.device):
    from diffusers import AutoencoderKL

    if not Path(vae_dir, "config.json").is_file():
        raise FileNotFoundError(f"--vae {vae_dir!r}: no config.json (expected a diffusers AutoencoderKL directory)")
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    return vae


@torch.no_grad()
def encode_images(vae, x: torch.Tensor, opts: CacheOptions, seeds: list[int] | None = None) -> torch.Tensor:
    """[n, 3, R, R] in [-1, 1] -> scaled latents [n, C, R/f, R/f]: (z - shift_factor) * scaling_factor."""
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    if opts.sample:
        noise = torch.stack(
            [
                torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(s))
                for s in (seeds or range(x.shape[0]))
            ]
        ).to(dist.mean)
        z = dist.mean + dist.std * noise
    else:
        z = dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, lat: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_images`: scaled latents [n, C, h, w] -> pixels [n, 3, R, R] (float, CPU)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((lat / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)).sample.float().cpu()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _read_image(parts: dict[str, bytes], prefix: str, opts: CacheOptions, role: str):
    """The ``{prefix}<ext>`` image of a sample (an editing triple's ``src.`` / ``tgt.``); BadSample reasons carry
    the role: ``missing_tgt``, ``src:corrupt_image``, ..."""
    ext = next((prefix + e for e in IMAGE_EXTS if prefix + e in parts), None)
    if ext is None:
        oversized = any(k.startswith("oversized_" + prefix) for k in parts)
        raise BadSample(f"{role}:oversized_member" if oversized else f"missing_{role}")
    try:
        return decode_image(parts[ext], opts)
    except BadSample as bad:
        raise BadSample(f"{role}:{bad.reason}") from None


def done_record(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".done.json")


def process_shard(vae, in_url: str, out_path: Path, opts: CacheOptions, crash_after: int | None = None) -> dict:
    """``crash_after`` (tests only) kills the process after that many samples of this shard."""
    """Encode one input shard into ``out_path`` atomically; return its counts (also written as the record)."""
    import webdataset as wds

    t0 = time.time()
    counts: Counter = Counter()
    out_path = Path(out_path)
    tmp = temp_sibling(out_path)  # unique per attempt
    batch: list[tuple[str, torch.Tensor, str, dict, np.ndarray | None]] = []
    writer = wds.TarWriter(str(tmp))

    names = ("src.npy", "tgt.npy") if opts.edit else ("npy",)

    def flush():
        if not batch:
            return
        x = torch.cat([b[1] for b in batch])  # [k * n, 3, R, R]: k images per sample (2 for a triple)
        tags = [f"{b[0]}/{name}" if opts.edit else b[0] for b in batch for name in names]
        seeds = [opts.seed * 1_000_003 + zlib.crc32(tag.encode()) for tag in tags]
        lat = encode_images(vae, x, opts, seeds).cpu().numpy().astype(np.float16)
        lat = lat.reshape(len(batch), len(names), *lat.shape[1:])  # [n, k, C, h, w]
        for (key, _, caption, meta, pixels), zs in zip(batch, lat):
            sample = {"__key__": key, "txt": caption, "json": json.dumps(meta)}
            sample.update({name: _npy_bytes(z) for name, z in zip(names, zs)})
            if pixels is not None:
                sample["pixels.npy"] = _npy_bytes(pixels)
            writer.write(sample)
            counts["out"] += 1
        batch.clear()

    try:
        for key, parts in iter_tar_groups(in_url):
            counts["in"] += 1
            if crash_after is not None and counts["in"] > crash_after:
                os._exit(17)  # fault injection for tests: the worker dies mid-shard
            try:
                if opts.edit:
                    caption = parts.get("txt", b"").decode("utf-8", errors="replace").strip()
                    if not caption:
                        raise BadSample("missing_instruction")
                    src, tgt = (_read_image(parts, f"{role}.", opts, role) for role in ("src", "tgt"))
                    meta = {"source_shard": in_url, "source_key": key, "width": src.width, "height": src.height}
                    x = torch.stack([preprocess(src, opts.resolution), preprocess(tgt, opts.resolution)])
                    pixels = None
                    batch.append((key, x, caption, meta, pixels))
                    if len(batch) >= opts.batch_size:
                        flush()
                    continue
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None:
                    oversized = any(k.startswith("oversized_") for k in parts)
                    raise BadSample("oversized_member" if oversized else "missing_image")
                caption = parts.get("txt", b"").decode("utf-8", errors="replace").strip()
                if not caption:
                    raise BadSample("missing_caption")
                im = decode_image(parts[ext], opts)
                meta = {"source_shard": in_url, "source_key": key, "width": im.width, "height": im.height}
                pixels = square_pixels(im, opts.keep_pixels) if opts.keep_pixels > 0 else None
                batch.append((key, preprocess(im, opts.resolution)[None], caption, meta, pixels))
            except BadSample as bad:
                counts["skipped/" + bad.reason] += 1
                continue
            if len(batch) >= opts.batch_size:
                flush()
    except BadSample as bad:  # the archive itself is cut: keep what was read, count the shard
        counts["skipped/" + bad.reason] += 1
    flush()
    writer.close()
    publish(tmp, out_path)
    record = {"input": in_url, "output": out_path.name, "seconds": round(time.time() - t0, 3), **counts}
    rec_path = done_record(out_path)
    write_text(rec_path, json.dumps(record, indent=1, sort_keys=True))
    return record
