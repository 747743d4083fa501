"""tools/precompute_latents.py on Ray (local, and through `ray job submit` to a real `ray start --head`),
and the latent-shard loader over its output."""

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "precompute_latents.py")
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def _png(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A real decompression bomb: a 100000 x 100000 header in front of a few bytes of data."""
    import struct
    import zlib

    png = bytearray(_png((4, 4)))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    png[ihdr + 8 : ihdr + 16] = struct.pack(">II", 100_000, 100_000)
    png[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(png[ihdr + 4 : ihdr + 21])))
    return bytes(png)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 generated shards of 20 good samples + 1 shard of 5 good and 6 bad members; a tiny VAE."""
    import webdataset as wds

    from megafusion.demo.shapes import samples, write_shards
    from megafusion.demo.tiny_vae import write_random_vae

    root = tmp_path_factory.mktemp("precompute")
    write_shards(root / "in", 60, shard_size=20, seed=11, size=48)
    good_png = _png((40, 40))
    bad = [
        ("bad-truncated", {"png": good_png[: len(good_png) // 2], "txt": "a cut image"}),
        ("bad-garbage", {"png": b"not an image at all", "txt": "garbage"}),
        ("bad-nocaption", {"png": good_png}),
        ("bad-small", {"png": _png((8, 8)), "txt": "tiny"}),
        ("bad-bomb", {"png": _bomb_png(), "txt": "too many pixels"}),
        ("bad-noimage", {"txt": "caption only"}),
    ]
    with wds.TarWriter(str(root / "in" / "shapes-000003.tar")) as w:
        for s in samples(5, seed=12, size=48):
            w.write({**s, "__key__": "extra" + s["__key__"]})
        for key, parts in bad:
            w.write({"__key__": key, **parts})
    vae = write_random_vae(root / "vae", downsample=4, latent_channels=4)
    good = set()
    for shard in sorted((root / "in").glob("*.tar")):
        with tarfile.open(shard) as t:
            good |= {n.split(".")[0] for n in t.getnames() if n.endswith(".png") and not n.startswith("bad-")}
    return {"root": root, "vae": vae, "good": good, "pattern": str(root / "in" / "shapes-{000000..000003}.tar")}


def _precompute(data, out, *extra, env=None, timeout=600):
    cmd = [
        sys.executable,
        TOOL,
        "--input",
        data["pattern"],
        "--output",
        str(out),
        "--vae",
        str(data["vae"]),
        "--resolution",
        "32",
        "--batch-size",
        "8",
        "--num-workers",
        "2",
        "--max-pixels",
        "200000",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _read_output(out: Path):
    keys, latents = [], {}
    for shard in sorted(out.glob("latents-*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    keys.append(meta["source_key"])
                if m.name.endswith(".npy"):
                    latents[m.name[:-4]] = np.load(io.BytesIO(t.extractfile(m).read()), allow_pickle=False)
    return keys, latents


@pytest.mark.slow
def test_precompute_exactly_once_equal_to_direct_encode_bad_samples_counted(data, tmp_path):
    r = _precompute(data, tmp_path / "out")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    keys, latents = _read_output(tmp_path / "out")
    assert sorted(keys) == sorted(data["good"])  # every good key exactly once
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["in"] == 71 and summary["out"] == 65 and summary["shards_done"] == 4
    sk = summary["skipped"]
    assert sk.get("missing_caption") == 1 and sk.get("too_small") == 1 and sk.get("decompression_bomb") == 1
    assert sk.get("missing_image") == 1 and sk.get("truncated_image", 0) + sk.get("corrupt_image", 0) == 2
    # a latent equals a direct vae.encode of the same preprocessed image (mode x scaling factor)
    from diffusers import AutoencoderKL

    from megafusion.data.latent_cache import preprocess

    vae = AutoencoderKL.from_pretrained(str(data["vae"])).eval()
    with tarfile.open(data["root"] / "in" / "shapes-000001.tar") as t:
        name = sorted(n for n in t.getnames() if n.endswith(".png"))[3]
        img = Image.open(io.BytesIO(t.extractfile(name).read())).convert("RGB")
    with torch.no_grad():
        want = vae.encode(preprocess(img, 32)[None]).latent_dist.mode()[0] * vae.config.scaling_factor
    got = torch.from_numpy(latents[name[:-4]].astype(np.float32))
    assert got.shape == (4, 8, 8)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    # a rerun finds everything done and encodes nothing
    r2 = _precompute(data, tmp_path / "out")
    assert r2.returncode == 0 and "0 to encode" in r2.stdout


@pytest.mark.slow
def test_worker_killed_mid_shard_then_rerun(data, tmp_path):
    out = tmp_path / "out"
    # the worker dies in shard 1 after 12 samples: one batch of 8 is already in its temporary tar
    r = _precompute(
        data, out, "--crash-after-samples", "12", "--crash-shard", "latents-000001.tar", "--max-retries", "0"
    )
    assert r.returncode != 0 and "rerun" in r.stderr and "worker died" in r.stdout
    assert sorted(p.name for p in out.glob("*.done.json")) == [
        "latents-000000.tar.done.json",
        "latents-000002.tar.done.json",
        "latents-000003.tar.done.json",
    ]
    assert not (out / "latents-000001.tar").exists() and list(out.glob("latents-000001.tar.*.tmp"))
    r = _precompute(data, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 to encode" in r.stdout  # finished shards are skipped, the dead one is redone
    keys, _ = _read_output(out)
    assert len(keys) == len(set(keys)) and set(keys) == data["good"]


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(data, latents_dir):
    r = _precompute(data, latents_dir, "--resolution", "16")
    assert r.returncode != 0 and "other settings" in r.stderr and "resolution" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(data, tmp_path):
    port, dash = _free_port(), _free_port()
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    start = subprocess.run(
        [
            "ray",
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        out = tmp_path / "job_out"
        job = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "tools/precompute_latents.py",
                "--input",
                data["pattern"],
                "--output",
                str(out),
                "--vae",
                str(data["vae"]),
                "--resolution",
                "32",
                "--num-workers",
                "2",
                "--max-pixels",
                "200000",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-2000:]
        keys, _ = _read_output(out)
        assert sorted(keys) == sorted(data["good"])
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def latents_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat")
    r = _precompute(data, out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _loader_cfg(latents_dir, tok, workers):
    from megafusion.config import load_config

    return load_config(
        "tiny",
        [
            f"data.path={latents_dir}/latents-{{000000..000003}}.tar",
            f"data.tokenizer={tok}",
            "data.seq_length=64",
            "data.micro_batch_size=2",
            f"data.num_workers={workers}",
            "data.shuffle_buffer=8",
        ],
    )


@pytest.mark.slow
def test_loader_ranks_and_workers_cover_the_dataset_once_and_resume_exactly(data, latents_dir, tmp_path):
    from megafusion.data.loader import make_loader
    from megafusion.demo.tokenizer import write_word_tokenizer

    tok = write_word_tokenizer(tmp_path / "tok")
    cfg = _loader_cfg(latents_dir, tok, workers=2)
    seen = []
    for rank in range(2):
        for batch in make_loader(cfg, rank, 2, max_epochs=1):
            seen += [k.split("#")[1] for k in batch.sample_keys]
    assert len(seen) == len(set(seen)) and set(seen) == data["good"]
    # fewer shards (4) than slots (3 ranks x 2 workers): samples are dealt one by one, still exactly once
    seen = []
    for rank in range(3):
        for batch in make_loader(cfg, rank, 3, max_epochs=1):
            seen += [k.split("#")[1] for k in batch.sample_keys]
    assert len(seen) == len(set(seen)) and set(seen) == data["good"]
    # resume: a loader started at micro-batch 3 yields what an uninterrupted one yields from 3 on
    full = [b for _, b in zip(range(8), make_loader(cfg, 0, 2))]
    resumed = [b for _, b in zip(range(5), make_loader(cfg, 0, 2, start_batch=3))]
    for a, b in zip(full[3:], resumed):
        assert a.sample_keys == b.sample_keys
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.latents, b.latents)


@pytest.mark.slow
def test_loader_mixes_text_only_shards_at_the_configured_ratio(latents_dir, tmp_path):
    import webdataset as wds

    from megafusion.config import load_config
    from megafusion.data.loader import make_loader
    from megafusion.demo.tokenizer import write_word_tokenizer

    tok = write_word_tokenizer(tmp_path / "tok")
    with wds.TarWriter(str(tmp_path / "text-000000.tar")) as w:
        for i in range(50):
            w.write({"__key__": f"t{i:04d}", "txt": "there is a picture of the image"})
    cfg = load_config(
        "tiny",
        [
            f"data.path={latents_dir}/latents-*.tar",
            f"data.tokenizer={tok}",
            "data.seq_length=64",
            "data.micro_batch_size=2",
            "data.num_workers=0",
            f"data.text_path={tmp_path}/text-*.tar",
            "data.text_ratio=0.5",
        ],
    )
    text_docs = image_docs = 0
    for batch in make_loader(cfg, 0, 1, max_epochs=1):
        for r in range(batch.input_ids.shape[0]):
            docs = batch.document_ids[r]
            for d in docs.unique().tolist():
                sel = docs == d
                if batch.input_ids[r][sel][0].item() != 2:  # padding documents do not start with <s>
                    continue
                if (batch.image_ids[r][sel] >= 0).any():
                    image_docs += 1
                else:
                    text_docs += 1
    assert image_docs == 65
    assert 0.35 < text_docs / (text_docs + image_docs) < 0.65, (text_docs, image_docs)


def test_captioning_pairs_get_capped_noise(latents_dir, tmp_path):
    """Images whose caption follows them are noised with t < diffusion.understanding_max_timestep; others not."""
    import torch

    from megafusion.config import load_config
    from megafusion.data.stream import LoaderStream
    from megafusion.demo.tokenizer import write_word_tokenizer

    tok = write_word_tokenizer(tmp_path / "tok")
    cfg = load_config(
        "tiny",
        [
            f"data.path={latents_dir}/latents-*.tar",
            f"data.tokenizer={tok}",
            "data.seq_length=64",
            "data.micro_batch_size=4",
            "data.num_workers=0",
            "data.caption_first_prob=0.5",
            "diffusion.caption_dropout=0.2",
        ],
    )
    eos = 3  # write_word_tokenizer's </s>
    T = cfg.model.image.tokens_per_image
    stream = LoaderStream(cfg, 0, 1, torch.device("cpu"), micro_per_step=1)
    capped, free = [], []
    for step in range(8):
        b = stream.item(step, 0).batch
        for i, t in enumerate(b.timesteps.tolist()):
            r, c = (b.image_ids == i).nonzero()[-1].tolist()  # the image's last token; <EOI> follows it
            image_first = b.position_ids[r, c - T + 1].item() == 2  # <s> <BOI> image ...
            (capped if image_first and b.input_ids[r, c + 2].item() != eos else free).append(t)
    assert capped and free
    assert max(capped) < cfg.diffusion.understanding_max_timestep == 500
    assert max(free) >= 500


@pytest.mark.slow
def test_loader_errors_name_the_problem(latents_dir, tmp_path):
    from megafusion.config import load_config
    from megafusion.data.loader import LatentSequenceDataset
    from megafusion.demo.tokenizer import write_word_tokenizer

    tok = write_word_tokenizer(tmp_path / "tok")
    # 65 samples cannot feed 100 slots
    cfg = _loader_cfg(latents_dir, tok, workers=0)
    ds = LatentSequenceDataset(cfg, dp_rank=99, dp_size=100, max_epochs=1)
    with pytest.raises(ValueError, match="read no sample"):
        next(iter(ds))
    # latents cached at another resolution than the model expects
    cfg = load_config("tiny", [f"data.path={latents_dir}", f"data.tokenizer={tok}", "model.image.image_size=64"])
    with pytest.raises(ValueError, match=r"latent of shape \(4, 8, 8\), the model expects \(4, 16, 16\)"):
        next(iter(LatentSequenceDataset(cfg, 0, 1)))


def _train_worker(rank, world, run_dir, hf, latents_dir, tok, steps):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config(
        "tiny",
        [
            f"data.path={latents_dir}/latents-{{000000..000003}}.tar",
            f"data.tokenizer={tok}",
            "data.seq_length=64",
            "data.micro_batch_size=1",
            "data.global_batch_size=2",
            "data.num_workers=2",
            "data.shuffle_buffer=8",
            "optim.warmup_steps=1",
            "logging.tensorboard=false",
            "checkpoint.interval=2",
            f"logging.run_dir={run_dir}",
        ],
    )
    init_model_parallel(1, 1)
    logs: list[str] = []
    trainer = Trainer(cfg, hf, log=logs.append)
    trainer.maybe_resume()
    history = trainer.run(steps)
    restored = any("data loader continues from its saved position" in line for line in logs)
    return {"losses": torch.tensor([h.loss for h in history], dtype=torch.float64), "restored": torch.tensor(restored)}


@pytest.mark.slow
def test_training_resume_restores_the_loader_position(latents_dir, tmp_path):
    """A run on latent shards stopped at step 2 and resumed continues from the saved loader position
    (no replay) with the losses of the uninterrupted run."""
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.demo.tokenizer import write_word_tokenizer
    from tests.helpers import run_distributed

    tok = str(write_word_tokenizer(tmp_path / "tok"))
    hf = str(write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=3))
    straight = run_distributed(_train_worker, 1, str(tmp_path / "a"), hf, str(latents_dir), tok, 4)[0]
    first = run_distributed(_train_worker, 1, str(tmp_path / "b"), hf, str(latents_dir), tok, 2)[0]
    assert (tmp_path / "b" / "checkpoints" / "step_00000002" / "data" / "dp0.json").is_file()
    second = run_distributed(_train_worker, 1, str(tmp_path / "b"), hf, str(latents_dir), tok, 4)[0]
    assert second["restored"].item() and not first["restored"].item()
    torch.testing.assert_close(torch.cat([first["losses"], second["losses"]]), straight["losses"], rtol=1e-6, atol=1e-7)
