"""The main job on the bundled tiny default, stage by stage (what `make demo` runs).

    python -m launcher.demo [--run-dir runs/demo] [--steps 100] [--nproc 2]

1. the shapes dataset as webdataset shards       (tools/make_shapes_dataset.py)
2. a small AutoencoderKL and word-level tokenizer (random VAE weights for now)
3. VAE latents on a local Ray                     (tools/precompute_latents.py)
4. LlamaFusion training, TP=2 on 2 gloo processes (torchrun -m launcher.train)
5. samples: images from held-out captions, captions of held-out images, text (tools/sample.py, TP=2)
Each stage is skipped when its output exists; the time of each is printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage(name: str, cmd: list[str]) -> float:
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"[demo] stage '{name}' failed with exit code {r.returncode}")
    return time.time() - t0


HELD_OUT = [("red", "circle", "top left"), ("blue", "square", "center"), ("green", "triangle", "bottom right"),
            ("yellow", "circle", "top right")]


def _sample_cmd(run: Path, vae: Path, tok: Path, args) -> list[str]:
    """tools/sample.py on the last checkpoint: captions and images drawn fresh (seeds the dataset does not use)."""
    from megafusion.data.shapes import caption_for, draw_shape

    held = run / "held_out"
    held.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (c, s, p) in enumerate(HELD_OUT):
        path = held / f"{i}_{c}_{s}_{p.replace(' ', '_')}.png"
        draw_shape(c, s, p, size=64).save(path)
        images.append(str(path))
    prompts = [caption_for(c, s, p) for c, s, p in reversed(HELD_OUT)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
              if args.nproc > 1 else [sys.executable])
    return [*launch, "tools/sample.py", "--tp", str(args.nproc), "--checkpoint", str(run / "train" / "checkpoints"),
            "--vae", str(vae), "--tokenizer", str(tok), "--out", str(run / "samples"), "--steps",
            str(args.sample_steps), "--prompts", *prompts, "--images", *images, "--text", "a red",
            "--max-new-tokens", "8"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--nproc", type=int, default=2, help="training processes (TP size)")
    ap.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the samples")
    args = ap.parse_args(argv)

    from megafusion.checkpoint.tiny_vae import write_random_vae
    from megafusion.config import load_config
    from megafusion.data.tiny_tokenizer import write_word_tokenizer

    run = (ROOT / args.run_dir).resolve()
    cfg = load_config("tiny")
    img = cfg.model.image
    times: dict[str, float] = {}
    data = run / "data" / "shapes"
    if not list(data.glob("*.tar")):
        times["dataset"] = _stage("dataset", [sys.executable, "tools/make_shapes_dataset.py", "--output", str(data),
                                              "--num", str(args.samples), "--shard-size", "500", "--size", "64"])
    t0 = time.time()
    vae = write_random_vae(run / "vae", downsample=img.vae_downsample, latent_channels=img.latent_channels)
    tok = write_word_tokenizer(run / "tokenizer")
    times["vae+tokenizer"] = time.time() - t0
    latents = run / "data" / "latents"
    times["latents"] = _stage("latents", [
        sys.executable, "tools/precompute_latents.py", "--input", str(data / "shapes-*.tar"), "--output", str(latents),
        "--vae", str(vae), "--resolution", str(img.image_size), "--batch-size", "64", "--num-workers", "2"])
    train = [f"data.path={latents}/latents-*.tar", f"data.tokenizer={tok}", f"logging.run_dir={run}/train",
             f"optim.train_steps={args.steps}", f"parallel.tensor_parallel={args.nproc}", "data.num_workers=1"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "launcher.train", "--config", "tiny", *train]
    else:
        cmd = [sys.executable, "-m", "launcher.train", "--config", "tiny", *train]
    times["train"] = _stage("train", cmd)
    times["sample"] = _stage("sample", _sample_cmd(run, vae, tok, args))
    print("[demo] stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"[demo] outputs in {run}: metrics {run}/train/metrics.jsonl, checkpoints {run}/train/checkpoints, "
          f"samples {run}/samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
