"""Fine-tuning a trained LlamaFusion on the bundled editing set, as the demo's editing stage runs it.

A short run on shape pairs gives the "trained" checkpoint; ``checkpoint.load_weights_only`` then
starts an editing fine-tune from its weights at step 0 with a fresh optimizer, LR schedule and data
stream. The references do not share the code under test: the trained weights are read back from
the checkpoint's safetensors file, the losses from the run's own metrics file, and the edits are
scored from the pixels by the shapes checker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
COMMON = [
    "data.seq_length=96",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "logging.tensorboard=false",
    "checkpoint.interval=1000",
    "diffusion.prediction=v",
    "diffusion.loss_weight=1.0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shape pairs and editing triples encoded with the shipped VAE, a tokenizer, a converted base Llama."""
    import webdataset as wds

    from megafusion.config import load_config
    from megafusion.data.latent_cache import CacheOptions, load_vae, process_shard
    from megafusion.demo.shape_edits import triples
    from megafusion.demo.shapes import write_shards
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.demo.tokenizer import write_word_tokenizer

    root = tmp_path_factory.mktemp("edit_finetune")
    vae = load_vae(str(ROOT / "megafusion" / "assets" / "shapes_vae"), CPU)
    (root / "pairs").mkdir()
    for i, url in enumerate(write_shards(root / "img", 96, shard_size=96, seed=3)):
        process_shard(vae, str(url), root / "pairs" / f"latents-{i:06d}.tar", CacheOptions(resolution=32))
    (root / "edits").mkdir()
    with wds.TarWriter(str(root / "edits_src.tar")) as w:
        for s in triples(256, seed=4):
            w.write(s)
    rec = process_shard(
        vae, str(root / "edits_src.tar"), root / "edits" / "latents-000000.tar", CacheOptions(resolution=32, edit=True)
    )
    assert rec["out"] == 256
    hf = write_random_hf_llama(load_config("tiny").model, root / "hf", seed=9)
    conv = root / "conv"
    r = subprocess.run(
        [sys.executable, "tools/convert_hf_llama.py", "--hf-dir", str(hf), "--out", str(conv), "--tp", "1"]
        + ["--pp", "1", "--config", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "hf": hf, "conv": conv, "tok": write_word_tokenizer(root / "tok")}


def _train(d, run: Path, data_dir: str, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.train", "--config", "tiny", *COMMON]
    cmd += [f"data.path={d['root'] / data_dir}/latents-*.tar", f"data.tokenizer={d['tok']}"]
    cmd += [f"checkpoint.hf_llama={d['hf']}", f"logging.run_dir={run}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_finetune_on_edits_starts_from_the_trained_weights_and_lowers_the_target_loss(data, tmp_path):
    from safetensors.torch import load_file

    pre = _train(
        data,
        tmp_path / "pre",
        "pairs",
        [f"checkpoint.load={data['conv']}", "optim.train_steps=12", "optim.lr=2e-3", "optim.warmup_steps=2"],
    )
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-3000:]
    trained = tmp_path / "pre" / "checkpoints" / "step_00000012"
    assert (trained / "meta.json").is_file()

    run = tmp_path / "edit"
    steps = 60
    ft = _train(
        data,
        run,
        "edits",
        [f"checkpoint.load={tmp_path / 'pre' / 'checkpoints'}", "checkpoint.load_weights_only=true"]
        + [f"optim.train_steps={steps}", "optim.lr=2e-3", "optim.min_lr=1e-3", "optim.warmup_steps=5"],
    )
    assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-3000:]
    out = ft.stdout + ft.stderr
    assert f"fine-tuning from the weights of {trained} (step 12 there; here step 0)" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # the step count starts anew
    assert rows[0]["lr"] == pytest.approx(2e-3 / 5)  # and so does the warm-up (a fresh schedule)
    assert all(r["lm_loss"] == 0.0 for r in rows)  # no LM loss on instructions by default
    diff = [r["diffusion_loss"] for r in rows]
    assert np.mean(diff[-10:]) < 0.8 * np.mean(diff[:10])

    # the fine-tune began at the trained weights: its step-60 weights moved away from them, and a
    # fine-tune of 0 steps' worth (1 step at lr ~0) keeps them
    saved = load_file(str(trained / "model" / "tp0_pp0.safetensors"))
    still = _train(
        data,
        tmp_path / "still",
        "edits",
        [f"checkpoint.load={tmp_path / 'pre' / 'checkpoints'}", "checkpoint.load_weights_only=true"]
        + ["optim.train_steps=1", "optim.lr=1e-30", "optim.min_lr=0", "optim.warmup_steps=1", "optim.weight_decay=0"],
    )
    assert still.returncode == 0, still.stdout[-2000:] + still.stderr[-3000:]
    after = load_file(str(tmp_path / "still" / "checkpoints" / "step_00000001" / "model" / "tp0_pp0.safetensors"))
    assert set(after) == set(saved)
    assert all(torch.allclose(after[k].float(), saved[k].float(), atol=1e-6) for k in saved)
    moved = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "model" / "tp0_pp0.safetensors"))
    assert any(not torch.allclose(moved[k].float(), saved[k].float(), atol=1e-4) for k in saved)


def test_weights_only_needs_a_complete_checkpoint(data, tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    r = _train(
        data,
        tmp_path / "run",
        "edits",
        [f"checkpoint.load={bad}", "checkpoint.load_weights_only=true", "optim.train_steps=1"],
    )
    assert r.returncode != 0 and f"{bad} is not a complete checkpoint (no meta.json)" in r.stdout + r.stderr


def test_a_random_image_tower_edits_at_chance(data, tmp_path):
    """The checker is not fooled: a LlamaFusion whose image tower is random edits near chance (a copy of the
    source would keep two attributes but never change the third; noise keeps and changes nothing)."""
    from PIL import Image
    from transformers import AutoTokenizer

    from megafusion.api import LlamaFusion
    from megafusion.config import load_config
    from megafusion.data.latent_cache import CacheOptions, decode_latents, encode_images, load_vae, preprocess
    from megafusion.demo.evaluation import edit_scores
    from megafusion.demo.shape_edits import edits, instruction_for
    from megafusion.demo.shapes import draw_shape

    torch.manual_seed(0)
    m = load_config("tiny").model
    model = LlamaFusion.from_hf_llama(
        str(data["hf"]), image=m.image, boi_token_id=m.boi_token_id, eoi_token_id=m.eoi_token_id
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(data["tok"]), local_files_only=True)
    vae = load_vae(str(ROOT / "megafusion" / "assets" / "shapes_vae"), CPU)
    held = edits("held_out")
    pics = [draw_shape(s["color"], s["shape"], s["position"], size=64) for s, _, _ in held]
    lat = encode_images(vae, torch.stack([preprocess(p, 32) for p in pics]), CacheOptions(resolution=32))
    instr = [instruction_for(a, v) for _, a, v in held]
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in instr)  # the demo tokenizer knows every word
    out = model.edit_image(
        lat,
        [tok(t, add_special_tokens=False)["input_ids"] for t in instr],
        bos_token_id=tok.bos_token_id,
        num_steps=10,
        text_guidance=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    pix = decode_latents(vae, out)
    recs = []
    for k, ((src, _, _), x) in enumerate(zip(held, pix, strict=True)):
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / f"edit_{k:03d}.png")
        recs.append({"instruction": instr[k], "source_attributes": src, "file": f"edit_{k:03d}.png"})
    (tmp_path / "samples.json").write_text(json.dumps({"edits": recs}))
    scores = edit_scores(tmp_path)
    assert scores["all"]["n"] == len(held) and len(held) > 40
    assert scores["all"]["correct"] <= 0.15
