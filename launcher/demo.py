"""The main job on the bundled tiny default, stage by stage (what `make demo` runs).

    python -m launcher.demo [--run-dir runs/demo] [--steps 100] [--nproc 2]

1. the shapes dataset as webdataset shards        (tools/make_shapes_dataset.py)
2. a small AutoencoderKL trained on shapes         (tools/train_vae.py), a word-level tokenizer, and a
   small text-only base Llama pretrained on text   (tools/train_base_llama.py)
3. the base Llama converted to a TP=2 checkpoint   (tools/convert_hf_llama.py)
4. VAE latents on a local Ray                      (tools/precompute_latents.py)
5. LlamaFusion training from the converted checkpoint, TP=2 on 2 gloo processes (torchrun -m launcher.train)
6. samples: images from captions, captions of freshly drawn images, text (tools/sample.py, TP=2)
7. scores (tools/evaluate.py) and a report: run/report/report.md with the grids, loss curves, metrics.json
Each stage is skipped when its output exists; the time of each is printed.
"""

from __future__ import annotations

import argparse
import json
import random
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


def _launch(nproc: int) -> list[str]:
    """The interpreter prefix: torchrun with ``nproc`` gloo processes, or plain python for one."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable]


def held_out(run: Path, n: int, seed: int = 777) -> tuple[list[str], list[str]]:
    """n prompts and n freshly drawn images (seeds the dataset does not use); writes held_out/truth.json."""
    from megafusion.data.shapes import COLORS, POSITIONS, SHAPES, caption_for, draw_shape

    rng = random.Random(seed)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    folder = run / "held_out"
    folder.mkdir(parents=True, exist_ok=True)
    truth, images = {}, []
    for i, (c, s, p) in enumerate(rng.sample(combos, n)):
        path = folder / f"{i:03d}_{c}_{s}_{p.replace(' ', '_')}.png"
        draw_shape(c, s, p, size=64, jitter=0.03, rng=rng).save(path)
        images.append(str(path))
        truth[str(path)] = {"color": c, "shape": s, "position": p}
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    prompts = [caption_for(c, s, p) for c, s, p in rng.sample(combos, n)]
    return prompts, images


def _sample_cmd(run: Path, vae: Path, tok: Path, args) -> list[str]:
    """tools/sample.py on the last checkpoint: images from prompts, captions of fresh images, a text."""
    prompts, images = held_out(run, args.eval_samples)
    return [*_launch(args.nproc), "tools/sample.py", "--tp", str(args.nproc), "--checkpoint", str(run / "train" / "checkpoints"),
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
    ap.add_argument("--vae-steps", type=int, default=800, help="training steps of the VAE")
    ap.add_argument("--lm-steps", type=int, default=300, help="pretraining steps of the base Llama")
    ap.add_argument("--eval-samples", type=int, default=20, help="prompts and images to score")
    args = ap.parse_args(argv)

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
    vae, tok, base, conv = run / "vae", run / "tokenizer", run / "base_llama", run / "converted_tp"
    if not (vae / "config.json").is_file():
        times["vae"] = _stage("vae", [sys.executable, "tools/train_vae.py", "--out", str(vae), "--image-size",
                                      str(img.image_size), "--downsample", str(img.vae_downsample),
                                      "--latent-channels", str(img.latent_channels), "--steps", str(args.vae_steps)])
    write_word_tokenizer(tok)
    if not (base / "config.json").is_file():
        times["base llama"] = _stage("base llama", [sys.executable, "tools/train_base_llama.py", "--tokenizer",
                                                    str(tok), "--out", str(base), "--config", "tiny", "--steps",
                                                    str(args.lm_steps)])
    times["convert"] = _stage("convert", [sys.executable, "tools/convert_hf_llama.py", "--hf-dir", str(base), "--out",
                                          str(conv), "--tp", str(args.nproc), "--pp", "1", "--config", "tiny"])
    latents = run / "data" / "latents"
    times["latents"] = _stage("latents", [
        sys.executable, "tools/precompute_latents.py", "--input", str(data / "shapes-*.tar"), "--output", str(latents),
        "--vae", str(vae), "--resolution", str(img.image_size), "--batch-size", "64", "--num-workers", "2"])
    train = [f"data.path={latents}/latents-*.tar", f"data.tokenizer={tok}", f"logging.run_dir={run}/train",
             f"optim.train_steps={args.steps}", f"parallel.tensor_parallel={args.nproc}", "data.num_workers=1",
             f"checkpoint.hf_llama={base}", f"checkpoint.load={conv}",
             "diffusion.prediction=v"]  # v learns caption conditioning far sooner than eps here (see README)
    times["train"] = _stage("train", [*_launch(args.nproc), "-m", "launcher.train", "--config", "tiny", *train])
    times["sample"] = _stage("sample", _sample_cmd(run, vae, tok, args))
    times["evaluate"] = _stage("evaluate", [
        sys.executable, "tools/evaluate.py", "--samples", str(run / "samples"), "--truth",
        str(run / "held_out" / "truth.json"), "--checkpoint", str(run / "train" / "checkpoints"), "--base-llama",
        str(base), "--out", str(run / "report" / "metrics.json")])
    from megafusion.report import write_report

    report = write_report(run, json.loads((run / "report" / "metrics.json").read_text()), times)
    print("[demo] stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"[demo] outputs in {run}: metrics {run}/train/metrics.jsonl, checkpoints {run}/train/checkpoints, "
          f"samples {run}/samples, report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
