"""LLaVA-Fusion on the shapes data: pictures through the loader, a resumed stream, a short training run.

The shards are made as a user makes them (``process_shard`` of the precompute tool with --keep-pixels,
the shipped shapes VAE); the references do not share the code under test: pictures are re-read from the
tars with ``tarfile`` and normalised by hand, the resumed stream is compared to the uninterrupted one,
and the run's losses come from its own metrics file.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import LLAVA_IMAGE_TOKEN, make_tiny_hf_llava

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
P = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from megafusion.data.latent_cache import CacheOptions, load_vae, process_shard
    from megafusion.demo.shapes import write_shards
    from megafusion.demo.tokenizer import write_word_tokenizer

    root = tmp_path_factory.mktemp("llava_shapes")
    vae = load_vae(str(ROOT / "megafusion" / "assets" / "shapes_vae"), CPU)
    (root / "lat").mkdir()
    for i, url in enumerate(write_shards(root / "img", 96, shard_size=48, seed=3)):
        process_shard(vae, str(url), root / "lat" / f"latents-{i:06d}.tar", CacheOptions(resolution=32, keep_pixels=28))
    return {
        "root": root,
        "llava": make_tiny_hf_llava(root / "llava", seed=5),
        "tok": write_word_tokenizer(root / "tok"),
    }


def _overrides(d):
    return [
        f"data.path={d['root']}/lat/latents-*.tar",
        f"data.tokenizer={d['tok']}",
        f"checkpoint.hf_llama={d['llava']}",
        "data.vlm_understanding=true",
        "data.caption_first_prob=0.5",
        "data.seq_length=96",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "model.boi_token_id=297",
        "model.eoi_token_id=298",
    ]


def _stored_pictures(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted((root / "lat").glob("latents-*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".pixels.npy"):
                    out[f"{shard}#{m.name[: -len('.pixels.npy')]}"] = np.load(io.BytesIO(t.extractfile(m).read()))
    return out


def test_loader_carries_pictures_and_resumes(shapes):
    from megafusion.config import load_config
    from megafusion.data.stream import LoaderStream
    from megafusion.data.vlm_pictures import CLIP_MEAN, CLIP_STD

    stored = _stored_pictures(shapes["root"])
    assert len(stored) == 96 and all(a.shape == (3, 28, 28) and a.dtype == np.uint8 for a in stored.values())
    cfg = load_config("tiny", _overrides(shapes))
    stream = LoaderStream(cfg, 0, 1, CPU, 2)
    items, states = [], {}
    for step in range(12):
        items += [stream.item(step, m) for m in range(2)]
        states[step + 1] = json.dumps(stream.state_dict())
    pictures = 0
    by_hand = {
        k: ((a / 255.0 - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None])
        for k, a in stored.items()
    }
    for it in items:
        b = it.batch
        holders = int((b.input_ids == LLAVA_IMAGE_TOKEN).sum())
        n = 0 if b.pixel_values is None else b.pixel_values.shape[0]
        assert holders == P * n  # every picture fills its placeholders, nothing else looks like one
        assert not bool((b.loss_mask.bool() & (b.labels == LLAVA_IMAGE_TOKEN)).any())  # never a target
        assert bool((b.image_ids[b.input_ids == LLAVA_IMAGE_TOKEN] == -1).all())  # text positions
        if n:  # each picture is a stored one, normalised as CLIP's processor does
            for pic in b.pixel_values:
                assert min(np.abs(pic.numpy() - ref).max() for ref in by_hand.values()) < 1e-5
        pictures += n
    assert pictures >= 10  # about half the pairs are image-first
    resumed = LoaderStream(cfg, 0, 1, CPU, 2)
    resumed.load_state_dict([json.loads(states[5])], 5)
    for step in range(5, 12):
        for m in range(2):
            a, b = items[step * 2 + m].batch, resumed.item(step, m).batch
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
            assert (a.pixel_values is None) == (b.pixel_values is None)
            if a.pixel_values is not None:
                assert torch.equal(a.pixel_values, b.pixel_values)


def test_vlm_understanding_needs_a_llava(shapes, tiny_hf):
    from megafusion.config import load_config
    from megafusion.data.stream import LoaderStream

    over = [o for o in _overrides(shapes) if not o.startswith("checkpoint.hf_llama")]
    cfg = load_config("tiny", [*over, f"checkpoint.hf_llama={tiny_hf}"])
    with pytest.raises(ValueError, match="data.vlm_understanding=true needs checkpoint.hf_llama to be a LLaVA"):
        LoaderStream(cfg, 0, 1, CPU, 1).item(0, 0)


@pytest.mark.slow
def test_short_run_from_a_llava_lowers_the_diffusion_loss(shapes, tmp_path):
    """As a user runs it: convert the LLaVA (its dims replace the preset's), then train from the conversion."""
    run, conv = tmp_path / "run", tmp_path / "converted"
    ids = ["model.boi_token_id=297", "model.eoi_token_id=298"]
    convert = [sys.executable, "tools/convert_hf_llama.py", "--hf-dir", str(shapes["llava"]), "--out", str(conv)]
    proc = subprocess.run(
        [*convert, "--tp", "1", "--pp", "1", "--config", "tiny", *ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(conv / "config.yaml"),
        f"checkpoint.load={conv}",
        *_overrides(shapes),
        f"logging.run_dir={run}",
        "optim.train_steps=60",
        "optim.lr=2e-3",
        "optim.warmup_steps=5",
        "checkpoint.interval=1000",
        "logging.tensorboard=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60
    diff = [r["diffusion_loss"] for r in rows]
    assert np.mean(diff[-10:]) < 0.8 * np.mean(diff[:10])
