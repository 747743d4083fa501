"""The real entry point, as a user types it: python -m launcher.train and torchrun."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _clean_env() -> dict:
    """The test process's environment without rendezvous variables (a child picks its own)."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _run(cmd, timeout=300):
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    env = _clean_env()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout}s:\n{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_invalid_config_fails_before_anything_starts(tmp_path):
    r = _run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "--config",
            "tiny",
            "parallel.tensor_parallel=3",
            f"logging.run_dir={tmp_path}/run",
        ]
    )
    assert r.returncode == 2
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel=3" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing spawned


def test_unknown_key_is_named(tmp_path):
    r = _run([sys.executable, "-m", "launcher.train", "--config", "tiny", "optim.learning_rate=1"])
    assert r.returncode == 2 and "unknown config key 'optim.learning_rate'" in r.stderr


@pytest.mark.slow
def test_torchrun_tp2_sp_training_run(tmp_path):
    run_dir = tmp_path / "run"
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "launcher.train",
            "--config",
            "tiny",
            "parallel.tensor_parallel=2",
            "parallel.sequence_parallel=true",
            f"logging.run_dir={run_dir}",
            "optim.train_steps=4",
            "data.global_batch_size=4",
        ]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step      4/4" in r.stdout and "lm_loss" in r.stdout and "diffusion_loss" in r.stdout
    assert "mfu" in r.stdout and "tok/s" in r.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # quiet console: the known start-up warnings are filtered once, with a note, on both ranks
    assert r.stdout.count("known start-up warnings filtered") == 1
    assert "Warning" not in r.stderr and "warnings.warn" not in r.stderr, r.stderr[-3000:]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["tensor_parallel"] == 2 and resolved["parallel"]["sequence_parallel"] is True
    assert (run_dir / "base_llama" / "model.safetensors").is_file()


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    """What `make demo` runs, shortened: dataset -> VAE, base Llama -> convert (TP=2) -> reshard (TP=1) -> Ray
    latents -> DP=2 training of LlamaFusion, its editing fine-tune and the Transfusion-style baseline -> samples
    -> scores -> report."""
    r = _run(
        [
            sys.executable,
            "-m",
            "launcher.demo",
            "--run-dir",
            str(tmp_path / "demo"),
            "--samples",
            "200",
            "--steps",
            "3",
            "--lm-steps",
            "20",
            "--eval-samples",
            "4",
            "--edit-samples",
            "100",
            "--edit-steps",
            "3",
        ],
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] stage times: dataset" in r.stdout and "step      3/3" in r.stdout
    assert "copying the shipped megafusion/assets/shapes_vae" in r.stdout
    assert "converted_tp1 at step 0" in r.stdout  # LlamaFusion starts from the converted, resharded base Llama
    summary = yaml.safe_load((tmp_path / "demo" / "data" / "latents" / "summary.json").read_text())
    assert summary["out"] == 200
    run = tmp_path / "demo"
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for name in ("llamafusion", "transfusion"):
        assert (run / name / "train" / "checkpoints" / "latest").is_file()
        rec = json.loads((run / name / "samples" / "samples.json").read_text())
        assert len(rec["images"]) == 4 and len(rec["captions"]) == 4 and len(rec["text"]) == 1
        assert (run / name / "samples" / "images.png").is_file() and (run / name / "samples" / "captions.png").is_file()
        assert metrics[name]["generation"]["n"] == 4 and metrics[name]["understanding"]["n"] == 4
    # the frozen text tower keeps the base Llama's perplexity exactly; the baseline's trained tower does not
    lang, base_lang = metrics["llamafusion"]["language"], metrics["transfusion"]["language"]
    assert lang["trained_perplexity"] == pytest.approx(lang["base_perplexity"], rel=1e-9)
    assert base_lang["trained_perplexity"] != base_lang["base_perplexity"]
    report = (run / "report" / "report.md").read_text()
    assert "| score | llamafusion | transfusion |" in report and (run / "report" / "losses.png").is_file()
    assert "<th>score</th><th>llamafusion</th><th>transfusion</th>" in (run / "report" / "report.html").read_text()
    # the editing stage: a fine-tune from LlamaFusion's trained weights, every held-out edit sampled and scored
    from megafusion.demo.shape_edits import edits

    n_edits = len(edits("held_out"))
    last = run / "llamafusion" / "train" / "checkpoints" / "step_00000003"
    assert f"fine-tuning from the weights of {last} (step 3 there; here step 0)" in r.stdout + r.stderr
    assert (run / "llamafusion_edit" / "train" / "checkpoints" / "step_00000003").is_dir()
    summary = json.loads((run / "data" / "edit_latents" / "summary.json").read_text())
    assert summary["out"] == 100
    rec = json.loads((run / "llamafusion_edit" / "samples" / "samples.json").read_text())
    assert len(rec["edits"]) == n_edits and (run / "llamafusion_edit" / "samples" / "edits.png").is_file()
    assert metrics["llamafusion_edit"]["editing"]["all"]["n"] == n_edits
    assert "## Image editing" in report and (run / "report" / "loss_llamafusion_edit.png").is_file()
    # the TP=1-trained checkpoint sampled at TP=2 gives the same samples
    from launcher.demo import _sample_cmd, held_out

    model = run / "llamafusion"
    args = argparse.Namespace(sample_steps=25, guidance=2.0)  # the demo's default --guidance
    cmd = _sample_cmd(run, model, 2, args, *held_out(run, 4))
    cmd[cmd.index("--out") + 1] = str(model / "samples_tp2")
    r = _run(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec1 = json.loads((model / "samples" / "samples.json").read_text())
    rec2 = json.loads((model / "samples_tp2" / "samples.json").read_text())
    assert [c["ids"] for c in rec1["captions"]] == [c["ids"] for c in rec2["captions"]]
    assert rec1["text"] == rec2["text"]
    for k in range(4):
        a = np.asarray(Image.open(model / "samples" / f"image_{k:03d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(model / "samples_tp2" / f"image_{k:03d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 2  # float round-off across TP may move a pixel by a level


def test_demo_refuses_a_geometry_the_shipped_vae_lacks(tmp_path):
    r = _run(
        [sys.executable, "-m", "launcher.demo", "--run-dir", str(tmp_path / "demo"), "model.image.latent_channels=8"],
        timeout=120,
    )
    assert r.returncode != 0 and "model.image.latent_channels=8: add --train-vae" in r.stderr
    assert not (tmp_path / "demo").exists()  # refused before any stage ran


def test_sample_refuses_a_model_without_image_tower(tmp_path):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "hf")
    r = _run(
        [sys.executable, "tools/sample.py", "--checkpoint", str(hf), "--out", str(tmp_path / "o"), "--text", "hello"]
    )
    assert r.returncode == 1 and "without an image tower" in r.stderr
    r = _run(
        [
            sys.executable,
            "tools/sample.py",
            "--checkpoint",
            str(hf),
            "--out",
            str(tmp_path / "o"),
            "--prompts",
            "a red circle",
        ]
    )
    assert r.returncode == 2 and "--vae is needed" in r.stderr
