"""tools/train_vae.py and tools/train_base_llama.py produce models that work, judged without the code under test."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_trained_vae_reconstructs_what_the_checker_reads(tmp_path):
    """Reconstructions keep colour, shape and position (read from pixels); a random VAE's do not."""
    from diffusers import AutoencoderKL

    from megafusion.demo.tiny_vae import write_random_vae
    from megafusion.demo.vae_training import reconstruction_accuracy

    r = _tool("tools/train_vae.py", "--out", str(tmp_path / "vae"), "--image-size", "32", "--steps", "600")
    assert r.returncode == 0, r.stderr[-3000:]
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    acc = reconstruction_accuracy(vae, 32, n=200, seed=777)
    assert min(acc.values()) >= 0.9, acc
    rand = reconstruction_accuracy(
        AutoencoderKL.from_pretrained(str(write_random_vae(tmp_path / "rand"))), 32, n=200, seed=777
    )
    assert min(rand.values()) < 0.5, rand
    assert 0.05 < vae.config.scaling_factor < 50


def test_shipped_vae_reconstructs_and_records_how_it_was_made():
    """The demo's VAE (megafusion/assets/shapes_vae): a plain diffusers AutoencoderKL, made by tools/train_vae.py,
    whose reconstructions of freshly drawn shapes read back right and whose scaled latents have unit std."""
    import json
    import random

    import torch
    from diffusers import AutoencoderKL

    from megafusion.demo.vae_training import reconstruction_accuracy, shapes_batch

    folder = ROOT / "megafusion" / "assets" / "shapes_vae"
    made = json.loads((folder / "training.json").read_text())
    assert made["args"]["steps"] == 800 and made["args"]["image_size"] == 32
    vae = AutoencoderKL.from_pretrained(str(folder)).eval()
    acc = reconstruction_accuracy(vae, 32, n=200, seed=2024)  # seeds neither training nor its own check used
    assert min(acc.values()) >= 0.95, acc
    with torch.no_grad():
        z = vae.encode(shapes_batch(256, 32, random.Random(99))[0]).latent_dist.mode() * vae.config.scaling_factor
    assert 0.8 < float(z.std()) < 1.25


@pytest.mark.slow
def test_base_llama_learns_the_caption_language(tmp_path):
    from transformers import LlamaForCausalLM

    from megafusion.config import load_config
    from megafusion.demo.base_lm import perplexity, text_corpus
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.demo.tokenizer import write_word_tokenizer

    tok = write_word_tokenizer(tmp_path / "tok")
    r = _tool(
        "tools/train_base_llama.py",
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "base"),
        "--config",
        "tiny",
        "--steps",
        "150",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))  # a plain HF Llama
    held = text_corpus(100, seed=99)
    trained = perplexity(tmp_path / "base", tok, held)
    untrained = perplexity(write_random_hf_llama(load_config("tiny").model, tmp_path / "rand"), tok, held)
    assert trained < 3.0 and untrained > 100, (trained, untrained)
