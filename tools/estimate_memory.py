#!/usr/bin/env python
"""Per-GPU memory, FLOPs and MFU of a LlamaFusion training layout, and which layouts fit a GPU.

    python tools/estimate_memory.py --config llama3-70b-fusion --gpus 256
    python tools/estimate_memory.py --config llama3-8b-fusion --gpus 64 --step-time 9.5 --layouts
    python tools/estimate_memory.py --config tiny --dtype float32 --gpus 1
    python tools/estimate_memory.py --config my-llava-fusion.yaml --hf-dir /models/llava-1.5-7b-hf --gpus 16

Prints, for the config's TP x PP (x VPP) layout on --gpus GPUs, each pipeline stage's
frozen bf16 weights, trainable weights, gradients, ZeRO-partitioned optimizer state (fp32
master + Adam moments), the ZeRO bucket, activations (with the config's activation
checkpointing and pipeline in-flight micro-batches) and the peak; then FLOPs per step and,
with --step-time, MFU. --layouts adds a table of the TP x PP x DP layouts that fit a GPU of
--gpu-gb (with and without activation checkpointing). Exit status 1 if the config's layout
does not fit. See megafusion/planning/memory.py for what is exact and what is modelled.

The model's dimensions come from the config (for a LLaVA: a YAML whose model is its language
model). When the run starts from a LLaVA (--hf-dir, or the config's checkpoint.hf_llama when that
directory is readable here), its frozen CLIP vision tower + projector (LLaVA-Fusion) is added to the
first stage's frozen weights: counted exactly from the LLaVA's config.json, in the parameter dtype,
whole on every TP rank, no gradients or optimizer state. The directory's text dimensions must match
the config's (as training requires).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vision_spec(cfg, hf_dir: str | None):
    """The LLaVA vision path of ``hf_dir`` (or of checkpoint.hf_llama when readable), None for a plain Llama.

    ValueError if an explicit ``hf_dir`` has no config.json or its text dimensions differ from the config's.
    """
    from megafusion.checkpoint.hf_import import model_config_from_hf, read_hf_config, vision_spec_from_hf

    path = hf_dir or cfg.checkpoint.hf_llama
    if not path or (not hf_dir and not (Path(path) / "config.json").is_file()):
        return None  # planning away from the weights: the config's model alone
    hf, m = read_hf_config(path), cfg.model
    theirs = model_config_from_hf(hf, image=m.image, boi_token_id=m.boi_token_id, eoi_token_id=m.eoi_token_id)
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(theirs, key) != getattr(m, key):  # the check training makes (training/stages.py)
            raise ValueError(f"{path}: {key}={getattr(theirs, key)} but the config says model.{key}={getattr(m, key)}")
    return vision_spec_from_hf(hf)


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="preset name or YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument(
        "--gpus", type=int, default=None, help="GPUs in the job (default: TP x PP x data_parallel, or TP x PP)"
    )
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parameter dtype")
    ap.add_argument("--image-fraction", type=float, default=0.5, help="share of sequence tokens that are image tokens")
    ap.add_argument("--step-time", type=float, default=None, help="seconds per optimizer step, for MFU")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--layouts", action="store_true", help="also list the layouts that fit --gpu-gb")
    ap.add_argument(
        "--hf-dir",
        default=None,
        help="HF Llama or LLaVA directory the run starts from (only its config.json is read; default: the "
        "config's checkpoint.hf_llama if readable); a LLaVA adds its frozen vision tower to the first stage",
    )
    ap.add_argument(
        "--write-gbps",
        type=float,
        default=20.0,
        help="aggregate write bandwidth of the checkpoint filesystem in GB/s, for the save time",
    )
    args = ap.parse_args(argv)

    from megafusion.config import ConfigError, load_config
    from megafusion.parallel.layout import layout_of, with_layout
    from megafusion.planning.memory import (
        GIB,
        candidate_layouts,
        checkpoint_bytes,
        fits,
        human,
        mfu,
        stage_memory,
        step_flops,
        vision_params,
    )

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p = cfg.parallel
    gpus = args.gpus or p.tensor_parallel * p.pipeline_parallel * max(1, p.data_parallel)
    if gpus % (p.tensor_parallel * p.pipeline_parallel):
        print(
            f"error: --gpus {gpus} is not a multiple of TP x PP = {p.tensor_parallel * p.pipeline_parallel}",
            file=sys.stderr,
        )
        return 2
    nbytes = 2 if args.dtype == "bfloat16" else 4
    lay = layout_of(cfg, gpus)
    try:
        vision = _vision_spec(cfg, args.hf_dir)
        stages = stage_memory(cfg, lay, nbytes, args.image_fraction, vision)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{cfg.name}: {lay} on {gpus} GPUs of {args.gpu_gb:g} GiB, {args.dtype} parameters, seq {cfg.data.seq_length}, "
        f"global batch {cfg.data.global_batch_size}"
    )
    cols = ("stage", "frozen", "trainable", "grads", "optimizer", "bucket", "activations", "peak")
    print("  ".join(f"{c:>12s}" for c in cols))
    for sm in stages:
        vals = (sm.frozen_weights, sm.trainable_weights, sm.gradients, sm.optimizer, sm.bucket, sm.activations, sm.peak)
        print(f"{sm.stage:>12s}  " + "  ".join(f"{human(v):>12s}" for v in vals))
    if vision is not None:
        n = vision_params(vision)
        print(
            f"LLaVA vision tower + projector: {n / 1e6:.1f}M frozen parameters ({vision.layers_needed} of "
            f"{vision.num_layers} CLIP layers run) = {human(n * nbytes)} on every TP rank of the first stage "
            "(in its frozen column; no gradients, no optimizer state)"
        )
    peak = max(sm.peak for sm in stages)
    ok = peak <= 0.9 * args.gpu_gb * GIB
    print(f"peak {peak / GIB:.1f} GiB per GPU: {'fits' if ok else 'does NOT fit'} {args.gpu_gb:g} GiB (90% usable)")
    flops = step_flops(cfg, args.image_fraction)
    print(
        f"FLOPs per step {flops:.3e} ({flops / gpus:.3e} per GPU)"
        + (
            f"; MFU at {args.step_time:g} s/step: "
            f"{100 * mfu(cfg, args.step_time, gpus, args.peak_tflops, args.image_fraction):.1f}%"
            f" of {args.peak_tflops:g} TFLOP/s"
            if args.step_time
            else ""
        )
    )
    ck_total, ck_rank = checkpoint_bytes(cfg, lay, nbytes)
    save_s = ck_total / (args.write_gbps * 1e9)
    print(
        f"checkpoint per save {human(ck_total)} (busiest rank writes {human(ck_rank)}); at {args.write_gbps:g} GB/s "
        f"aggregate it takes ~{save_s:.0f} s to write (in the background: the loop waits only for the host copy); "
        f"a preemption save needs a signal lead time (--signal=B:USR1@N) of at least 2 x {save_s:.0f} s plus one step"
    )
    if args.layouts:
        print(f"\nlayouts on {gpus} GPUs that fit {args.gpu_gb:g} GiB (90% usable):")
        print(f"{'layout':>34s}  {'peak':>9s}  {'activations':>12s}  {'optimizer':>10s}")
        rows = []
        for cand in candidate_layouts(cfg, gpus):
            c2 = with_layout(cfg, cand)
            good, pk = fits(c2, cand, args.gpu_gb, nbytes, args.image_fraction, vision=vision)
            if good:
                worst = max(stage_memory(c2, cand, nbytes, args.image_fraction, vision), key=lambda sm: sm.peak)
                rows.append((pk, cand, worst))
        for pk, cand, worst in sorted(rows, key=lambda r: (r[1].pp, r[1].tp, r[1].activation_checkpointing))[:24]:
            print(f"{str(cand):>34s}  {pk:7.1f}Gi  {human(worst.activations):>12s}  {human(worst.optimizer):>10s}")
        if not rows:
            print("  none")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
