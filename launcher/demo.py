"""The main job on the bundled tiny default, stage by stage (what `make demo` runs).

    python -m launcher.demo [--run-dir runs/demo] [--steps 1000] [--nproc 2] [--tp 1] [--no-baseline] [key=value ...]

1. the shapes dataset as webdataset shards        (tools/make_shapes_dataset.py)
2. a small AutoencoderKL: the shipped one        (megafusion/assets/shapes_vae, made by tools/train_vae.py;
   --train-vae trains a fresh one, ~2.5 min), a word-level tokenizer, and a
   small text-only base Llama pretrained on text   (tools/train_base_llama.py)
3. the base Llama converted to a TP=2 checkpoint   (tools/convert_hf_llama.py), re-cut for the training
   layout when it differs                          (tools/reshard_checkpoint.py)
4. VAE latents on a local Ray                      (tools/precompute_latents.py)
5. LlamaFusion training from that checkpoint on 2 gloo processes (torchrun -m launcher.train --config demo;
   DP=2 with ZeRO by default, --tp 2 for tensor parallelism)
6. samples: an image for every colour x shape x position caption, captions of freshly drawn images, a text
   (tools/sample.py)
7. image editing (--no-edit skips it): the bundled editing set (tools/make_shapes_edits.py), its latents
   (tools/precompute_latents.py --edit), LlamaFusion fine-tuned on it from its trained weights
   (launcher.train --config demo_edit), every held-out edit sampled (tools/sample.py --edit) and scored
8. the Transfusion-style baseline (model.architecture=transfusion: one tower, every weight trained),
   same data, steps and batch, started from the base Llama, and its samples
9. scores (tools/evaluate.py) and a report: run/report/report.md with both models side by side and the edits
Each model gets run/<model>/{train,samples,metrics.json}, the editing fine-tune run/llamafusion_edit.
Data stages are skipped when their output exists; the time of each stage is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERT_TP = 2  # the layout for the conversion; training may re-cut it
SHIPPED_VAE = ROOT / "megafusion" / "assets" / "shapes_vae"


def _stage(name: str, cmd: list[str], watch=None) -> float:
    """Run one stage; ``watch`` (a megafusion.demo.progress.TrainingWatch) reports the time left meanwhile."""
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    from megafusion.console import torchrun_env

    if watch is not None:
        watch.start()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=torchrun_env() if "torch.distributed.run" in cmd else None)
    finally:
        if watch is not None:
            watch.stop()
    if r.returncode != 0:
        raise SystemExit(f"[demo] stage '{name}' failed with exit code {r.returncode}")
    return time.time() - t0


SAMPLE_EVAL_S = 20.0  # sampling + scoring one model before it has been measured (about 20 s on 2 cores)


def _later_s(times: dict[str, float], plan: list[tuple[str, int]], i: int) -> Callable[[float, float], float]:
    """Seconds of the stages after training stage ``plan[i]`` (plan: each training stage's name and steps, in
    order): its sampling and scoring, then each later stage's start-up, its steps at the measured rate,
    sampling and scoring (measured ones reused)."""

    def later(step_s: float, startup_s: float) -> float:
        done = [times[k] for k in times if k.startswith(("sample ", "evaluate "))]
        sample_eval = 2 * sum(done) / len(done) if done else SAMPLE_EVAL_S
        return sample_eval + sum(startup_s + n * step_s + sample_eval for _, n in plan[i + 1 :])

    return later


def _launch(nproc: int) -> list[str]:
    """The interpreter prefix: torchrun with ``nproc`` gloo processes, or plain python for one."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable]


def held_out(run: Path, n: int, seed: int = 777) -> tuple[list[str], list[str]]:
    """n prompts and n freshly drawn images (seeds the dataset does not use); writes held_out/truth.json.

    With n = 60 the prompts are every colour x shape x position once.
    """
    from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES, caption_for, draw_shape

    rng = random.Random(seed)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    if not 1 <= n <= len(combos):
        raise SystemExit(f"--eval-samples {n} must lie in [1, {len(combos)}] (colour x shape x position)")
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


def _sample_cmd(run: Path, model_dir: Path, tp: int, args, prompts: list[str], images: list[str]) -> list[str]:
    """tools/sample.py on a model's last checkpoint: images from prompts, captions of fresh images, a text."""
    return [
        *_launch(tp),
        "tools/sample.py",
        "--tp",
        str(tp),
        "--checkpoint",
        str(model_dir / "train" / "checkpoints"),
        "--vae",
        str(run / "vae"),
        "--tokenizer",
        str(run / "tokenizer"),
        "--out",
        str(model_dir / "samples"),
        "--steps",
        str(args.sample_steps),
        "--guidance",
        str(args.guidance),
        "--prompts",
        *prompts,
        "--images",
        *images,
        "--text",
        "a red",
        "--max-new-tokens",
        "8",
    ]


def train_command(run: Path, name: str, config: str, nproc: int, tp: int, run_dir: Path, extra: list[str]) -> list[str]:
    """The training stage of model ``name`` (llamafusion | transfusion) on the data stages' outputs in ``run``.

    LlamaFusion starts from the converted checkpoint (it holds the recipe's image tower);
    the Transfusion-style baseline from the base Llama itself, every weight trainable.
    """
    start = run / f"converted_tp{tp}"
    own = {"llamafusion": [f"checkpoint.load={start}"], "transfusion": ["model.architecture=transfusion"]}[name]
    train = [
        f"data.path={run / 'data' / 'latents'}/latents-*.tar",
        f"data.tokenizer={run / 'tokenizer'}",
        f"logging.run_dir={run_dir}",
        f"checkpoint.hf_llama={run / 'base_llama'}",
        f"parallel.tensor_parallel={tp}",
        *extra,
        *own,
    ]
    return [*_launch(nproc), "-m", "launcher.train", "--config", config, *train]


def held_out_edits(run: Path, seed: int = 778) -> Path:
    """Every held-out edit of the bundled set once (combinations the fine-tune never sees edited), each
    source freshly drawn; writes run/held_out_edits/edits.json, the tools/sample.py --edit list."""
    from megafusion.demo.shape_edits import edits, instruction_for
    from megafusion.demo.shapes import draw_shape

    rng = random.Random(seed)
    folder = run / "held_out_edits"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (src, attr, value) in enumerate(edits("held_out")):
        name = f"{i:03d}_{attr}.png"
        draw_shape(src["color"], src["shape"], src["position"], size=64, jitter=0.03, rng=rng).save(folder / name)
        items.append({"source": name, "instruction": instruction_for(attr, value), "source_attributes": src})
    (folder / "edits.json").write_text(json.dumps(items, indent=1))
    return folder / "edits.json"


def edit_train_command(run: Path, nproc: int, tp: int, overrides: list[str]) -> list[str]:
    """The editing fine-tune: --config demo_edit from the LlamaFusion run's checkpoints (its weights only)."""
    train = [
        f"data.path={run / 'data' / 'edit_latents'}/latents-*.tar",
        f"data.tokenizer={run / 'tokenizer'}",
        f"logging.run_dir={run / 'llamafusion_edit' / 'train'}",
        f"checkpoint.hf_llama={run / 'base_llama'}",
        f"checkpoint.load={run / 'llamafusion' / 'train' / 'checkpoints'}",
        f"parallel.tensor_parallel={tp}",
        *overrides,
    ]
    return [*_launch(nproc), "-m", "launcher.train", "--config", "demo_edit", *train]


def _edit_overrides(args) -> list[str]:
    """The editing fine-tune's overrides: the demo's ``model.*`` ones (they must match the checkpoint) and
    ``--edit-steps``; the rest of its recipe is the demo_edit preset's."""
    own = [o for o in args.overrides if o.startswith("model.")]
    return own + ([f"optim.train_steps={args.edit_steps}"] if args.edit_steps else [])


def _edit_stages(run: Path, args, resolution: int, times: dict[str, float], edit_list: Path, watch) -> None:
    """Editing set, its latents, the fine-tune, edits of every held-out combination, their scores."""
    data, latents, out = run / "data" / "edits", run / "data" / "edit_latents", run / "llamafusion_edit"
    if not list(data.glob("*.tar")):
        times["edit dataset"] = _stage(
            "edit dataset",
            [sys.executable, "tools/make_shapes_edits.py", "--output", str(data), "--num", str(args.edit_samples)]
            + ["--shard-size", "500", "--size", "64"],
        )
    if not list(latents.glob("latents-*.tar")):
        times["edit latents"] = _stage(
            "edit latents",
            [sys.executable, "tools/precompute_latents.py", "--edit", "--input", str(data / "edits-*.tar")]
            + ["--output", str(latents), "--vae", str(run / "vae"), "--resolution", str(resolution)]
            + ["--batch-size", "64", "--num-workers", "2"],
        )
    times["train edit"] = _stage(
        "train edit", edit_train_command(run, args.nproc, args.tp, _edit_overrides(args)), watch
    )
    times["sample edit"] = _stage(
        "sample edit",
        [*_launch(args.tp), "tools/sample.py", "--tp", str(args.tp), "--checkpoint", str(out / "train" / "checkpoints")]
        + ["--vae", str(run / "vae"), "--tokenizer", str(run / "tokenizer"), "--out", str(out / "samples")]
        + ["--steps", str(args.sample_steps), "--edit", str(edit_list)]
        + ["--text-guidance", str(args.text_guidance), "--image-guidance", str(args.image_guidance)],
    )
    times["evaluate edit"] = _stage(
        "evaluate edit",
        [sys.executable, "tools/evaluate.py", "--samples", str(out / "samples"), "--out", str(out / "metrics.json")],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--samples", type=int, default=2000, help="image-caption pairs in the dataset")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of each model (default: the demo preset's optim.train_steps)",
    )
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of training (1 = DP over --nproc)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the Transfusion-style baseline")
    ap.add_argument("--no-edit", action="store_true", help="skip the image-editing fine-tune and its scores")
    ap.add_argument("--edit-samples", type=int, default=2000, help="triples in the editing set")
    ap.add_argument(
        "--edit-steps", type=int, default=None, help="fine-tuning steps on edits (default: the demo_edit preset's)"
    )
    ap.add_argument("--text-guidance", type=float, default=2.0, help="editing: instruction guidance of the samples")
    ap.add_argument(
        "--image-guidance",
        type=float,
        default=0.0,
        help="editing: source-image guidance (0 = off; 1 equals off at 1.5x the cost, 1.5 did not help here)",
    )
    ap.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the samples")
    ap.add_argument(
        "--guidance",
        type=float,
        default=2.0,
        help="classifier-free guidance of the samples (2: generation shape 0.67 -> 0.83 at the 1000-step recipe)",
    )
    ap.add_argument(
        "--train-vae",
        action="store_true",
        help="train the VAE with tools/train_vae.py instead of "
        "copying the shipped one (which that tool made with its defaults)",
    )
    ap.add_argument("--vae-steps", type=int, default=800, help="training steps of the VAE (with --train-vae)")
    ap.add_argument("--lm-steps", type=int, default=300, help="pretraining steps of the base Llama")
    ap.add_argument(
        "--eval-samples",
        type=int,
        default=60,
        help="prompts and images to score (60 = every colour x shape x position)",
    )
    ap.add_argument(
        "--config",
        default="demo",
        help="the preset or YAML both models train with (default: demo; benchmarks/bench_demo_train.py "
        "compares it with the one before issue 19)",
    )
    ap.add_argument(
        "--data-only",
        action="store_true",
        help="stop after the data stages (dataset, VAE, base Llama, conversion, latents)",
    )
    ap.add_argument("--log-scale", action="store_true", help="the report's loss curves on a log axis")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo preset, for both models")
    args = ap.parse_args(argv)

    from megafusion.config import load_config, validate_config
    from megafusion.demo.progress import TrainingWatch
    from megafusion.demo.tokenizer import write_word_tokenizer

    run = (ROOT / args.run_dir).resolve()
    extra = ([f"optim.train_steps={args.steps}"] if args.steps else []) + args.overrides
    cfg = validate_config(
        load_config(args.config, [f"parallel.tensor_parallel={args.tp}", *extra]), world_size=args.nproc
    )  # fail before any stage runs
    img, steps = cfg.model.image, cfg.optim.train_steps
    edit_steps = 0
    if not args.no_edit:
        edit_cfg = validate_config(
            load_config("demo_edit", [f"parallel.tensor_parallel={args.tp}", *_edit_overrides(args)]),
            world_size=args.nproc,
        )
        edit_steps = edit_cfg.optim.train_steps
    vae, tok, base, conv = run / "vae", run / "tokenizer", run / "base_llama", run / f"converted_tp{CONVERT_TP}"
    copy_vae = not args.train_vae and not (vae / "config.json").is_file()
    if copy_vae:  # the shipped VAE fits one latent geometry
        shipped = json.loads((SHIPPED_VAE / "config.json").read_text())
        down = 2 ** (len(shipped["block_out_channels"]) - 1)
        if (down, shipped["latent_channels"]) != (img.vae_downsample, img.latent_channels):
            raise SystemExit(
                f"[demo] the shipped VAE has vae_downsample={down}, latent_channels="
                f"{shipped['latent_channels']}; the config asks for model.image.vae_downsample="
                f"{img.vae_downsample}, model.image.latent_channels={img.latent_channels}: add --train-vae"
            )
    prompts, images = held_out(run, args.eval_samples)  # the same for both models; checks --eval-samples up front
    edit_list = None if args.no_edit else held_out_edits(run)
    times: dict[str, float] = {}
    data = run / "data" / "shapes"
    if not list(data.glob("*.tar")):
        times["dataset"] = _stage(
            "dataset",
            [
                sys.executable,
                "tools/make_shapes_dataset.py",
                "--output",
                str(data),
                "--num",
                str(args.samples),
                "--shard-size",
                "500",
                "--size",
                "64",
            ],
        )
    if copy_vae:
        print(f"[demo] vae: copying the shipped {SHIPPED_VAE.relative_to(ROOT)} (--train-vae trains one)", flush=True)
        shutil.copytree(SHIPPED_VAE, vae)
    if not (vae / "config.json").is_file():
        times["vae"] = _stage(
            "vae",
            [
                sys.executable,
                "tools/train_vae.py",
                "--out",
                str(vae),
                "--image-size",
                str(img.image_size),
                "--downsample",
                str(img.vae_downsample),
                "--latent-channels",
                str(img.latent_channels),
                "--steps",
                str(args.vae_steps),
            ],
        )
    write_word_tokenizer(tok)
    if not (base / "config.json").is_file():
        times["base llama"] = _stage(
            "base llama",
            [
                sys.executable,
                "tools/train_base_llama.py",
                "--tokenizer",
                str(tok),
                "--out",
                str(base),
                "--config",
                "tiny",
                "--steps",
                str(args.lm_steps),
            ],
        )
    times["convert"] = _stage(
        "convert",
        [
            sys.executable,
            "tools/convert_hf_llama.py",
            "--hf-dir",
            str(base),
            "--out",
            str(conv),
            "--tp",
            str(CONVERT_TP),
            "--pp",
            "1",
            "--config",
            args.config,
            *args.overrides,
        ],
    )
    if args.tp != CONVERT_TP:  # train_command starts from run/converted_tp{tp}
        start = run / f"converted_tp{args.tp}"
        times["reshard"] = _stage(
            "reshard",
            [
                sys.executable,
                "tools/reshard_checkpoint.py",
                "--in",
                str(conv),
                "--out",
                str(start),
                "--tp",
                str(args.tp),
                "--pp",
                "1",
                "--dp",
                str(args.nproc // args.tp),
                "--no-progress",
            ],
        )
    latents = run / "data" / "latents"
    times["latents"] = _stage(
        "latents",
        [
            sys.executable,
            "tools/precompute_latents.py",
            "--input",
            str(data / "shapes-*.tar"),
            "--output",
            str(latents),
            "--vae",
            str(vae),
            "--resolution",
            str(img.image_size),
            "--batch-size",
            "64",
            "--num-workers",
            "2",
        ],
    )

    if args.data_only:
        print("[demo] data stages done (--data-only): " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        return 0
    names = ["llamafusion"] + ([] if args.no_baseline else ["transfusion"])
    plan = [("llamafusion", steps)] + ([] if args.no_edit else [("edit", edit_steps)])
    plan += [(n, steps) for n in names[1:]]
    order = [n for n, _ in plan]
    for name in names:
        out = run / name
        i = order.index(name)
        watch = TrainingWatch(f"train {name}", out / "train" / "metrics.jsonl", steps, _later_s(times, plan, i))
        times[f"train {name}"] = _stage(
            f"train {name}", train_command(run, name, args.config, args.nproc, args.tp, out / "train", extra), watch
        )
        times[f"sample {name}"] = _stage(f"sample {name}", _sample_cmd(run, out, args.tp, args, prompts, images))
        times[f"evaluate {name}"] = _stage(
            f"evaluate {name}",
            [
                sys.executable,
                "tools/evaluate.py",
                "--samples",
                str(out / "samples"),
                "--truth",
                str(run / "held_out" / "truth.json"),
                "--checkpoint",
                str(out / "train" / "checkpoints"),
                "--base-llama",
                str(base),
                "--out",
                str(out / "metrics.json"),
            ],
        )
        if name == "llamafusion" and edit_list is not None:
            i = order.index("edit")
            metrics_file = run / "llamafusion_edit" / "train" / "metrics.jsonl"
            watch = TrainingWatch("train edit", metrics_file, edit_steps, _later_s(times, plan, i))
            _edit_stages(run, args, img.image_size, times, edit_list, watch)
    from megafusion.demo.report import write_report

    metrics = {name: json.loads((run / name / "metrics.json").read_text()) for name in names}
    editing = None if edit_list is None else json.loads((run / "llamafusion_edit" / "metrics.json").read_text())
    report = write_report(run, metrics, times, editing, log_scale=args.log_scale)
    print("[demo] stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"[demo] total {sum(times.values()):.0f}s; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
