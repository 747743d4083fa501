#!/usr/bin/env python
"""Sample from a trained LlamaFusion: text -> image, image -> caption, text -> text, image + instruction -> image.

    python tools/sample.py --checkpoint runs/demo/llamafusion/train/checkpoints --vae runs/demo/vae \\
        --prompts "a red circle at the top left" "a blue square at the center" --out samples/
    python tools/sample.py --checkpoint exported/ --vae vae/ --images a.png b.png --out samples/
    python tools/sample.py --checkpoint exported/ --text "The capital of France is" --out samples/
    python tools/sample.py --checkpoint runs/demo/llamafusion_edit/train/checkpoints --vae runs/demo/vae \
        --edit edits.json --text-guidance 2 --image-guidance 1.5 --out samples/
    torchrun --nproc_per_node 2 tools/sample.py --tp 2 ...        # tensor parallel (NCCL on GPUs, gloo on CPU)
    srun --ntasks 2 python tools/sample.py --tp 2 ...             # the same under SLURM (SLURM_PROCID/NTASKS)

--checkpoint is a tools/export_hf.py directory, a checkpoint folder, or a save directory with a
`latest` pointer. Writes into --out: images.png (the samples, each prompt under its image),
captions.png (input images with their captions), and samples.json (prompts, seeds, settings,
token ids and texts). Prompts are tokenized as in training: <s> caption, then <BOI>.

--edit reads a JSON list of {"source": image path, "instruction": text, ...} (other keys are kept in
samples.json) and writes edits.png (each source beside its edit, the instruction underneath) and
edit_NNN.png; the source and instruction sit in the KV prefix, computed once per batch
(LlamaFusion.edit_image). --text-guidance and --image-guidance are the two scales (0 = off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="exported dir, checkpoint folder, or save dir with `latest`")
    ap.add_argument("--vae", help="diffusers AutoencoderKL directory (needed for --prompts and --images)")
    ap.add_argument("--tokenizer", help="HF tokenizer directory (default: the checkpoint's, then the base Llama's)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--prompts", nargs="*", default=[], help="captions to draw")
    ap.add_argument(
        "--prompts-file",
        help="a text file, one caption per line, or a COCO-style JSON (captions_*.json: its annotations' "
        "captions, or a list of {caption, id / image_id}); the ids are kept in samples.json",
    )
    ap.add_argument("--images", nargs="*", default=[], help="image files to caption")
    ap.add_argument("--text", nargs="*", default=[], help="text prompts to continue")
    ap.add_argument("--edit", help='JSON list of {"source": image, "instruction": text} to edit')
    ap.add_argument(
        "--text-guidance", type=float, default=None, help="editing: instruction guidance (default --guidance; 0 = off)"
    )
    ap.add_argument(
        "--image-guidance", type=float, default=0.0, help="editing: source-image guidance (0 = off; needs text)"
    )
    ap.add_argument("--steps", type=int, default=50, help="denoising steps")
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0 = unguided)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--do-sample", action="store_true", help="sample text (default greedy)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts/images per forward batch")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (= the number of processes)")
    ap.add_argument(
        "--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="parameter dtype (auto: bf16 on CUDA)"
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA when available")
    return ap.parse_args(argv)


def _prompt_file(path: str) -> tuple[list[str], list[dict]]:
    """Captions of a --prompts-file and, per caption, the ids to keep ({} for a text file)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"--prompts-file {path}: {exc}") from None
    if p.suffix != ".json":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines, [{} for _ in lines]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--prompts-file {path}: not JSON ({exc})") from None
    items = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"--prompts-file {path}: expected a COCO captions file (annotations) or a list of captions")
    caps, ids = [], []
    for k, a in enumerate(items):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise ValueError(f'--prompts-file {path}: item {k} has no "caption" text: {a!r}')
        caps.append(" ".join(a["caption"].split()))
        ids.append({key: a[key] for key in ("id", "image_id") if key in a})
    return caps, ids


def _edit_list(path: str) -> list[dict]:
    """The --edit file: a JSON list of objects, each with a "source" image path and an "instruction" text."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--edit {path}: {exc}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"--edit {path}: expected a non-empty JSON list of {{source, instruction}} objects")
    for k, e in enumerate(items):
        if not isinstance(e, dict) or not isinstance(e.get("source"), str) or not isinstance(e.get("instruction"), str):
            raise ValueError(f'--edit {path}: item {k} needs a "source" path and an "instruction" text, got {e!r}')
    base = Path(path).parent
    return [{**e, "source": str(e["source"] if Path(e["source"]).is_absolute() else base / e["source"])} for e in items]


def _tokenizer(args, loaded):
    from transformers import AutoTokenizer

    dirs = [args.tokenizer] if args.tokenizer else loaded.tokenizer_dirs
    for d in dirs:
        if d and any(Path(d).glob("tokenizer*")):
            return AutoTokenizer.from_pretrained(d, local_files_only=True)
    raise FileNotFoundError(f"no tokenizer found in {dirs}; pass --tokenizer DIR")


def _grid(images, labels, path: Path) -> None:
    """PNG grid: each image with its label wrapped underneath."""
    import textwrap

    from PIL import Image, ImageDraw

    side = max(128, max(im.size[0] for im in images))
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    text_h = 48
    sheet = Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        sheet.paste(im.resize((side, side)), (x, y))
        draw.multiline_text((x + 3, y + side + 2), "\n".join(textwrap.wrap(label, width=side // 6)[:3]), fill="black")
    sheet.save(path)


def _to_pil(x):
    import numpy as np
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def main(argv=None) -> int:
    from megafusion.console import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core / DeepSpeed / diffusers are imported (megafusion/console.py)
    args = _args(argv)
    prompts = list(args.prompts)
    prompt_ids: list[dict] = [{} for _ in prompts]
    if args.prompts_file:
        try:
            more, ids = _prompt_file(args.prompts_file)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        prompts += more
        prompt_ids += ids
    try:
        edits = _edit_list(args.edit) if args.edit else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (prompts or args.images or args.text or edits):
        print("error: nothing to do: give --prompts/--prompts-file, --images, --text or --edit", file=sys.stderr)
        return 2
    if (prompts or args.images or edits) and not args.vae:
        print(
            "error: --vae is needed to decode sampled images and to encode --images and --edit sources", file=sys.stderr
        )
        return 2
    missing = [p for p in args.images + [e["source"] for e in edits] if not Path(p).is_file()]
    if missing:
        print(f"error: --images/--edit: no such file(s): {missing}", file=sys.stderr)
        return 2
    from megafusion.parallel.rank_env import rank_env

    world = rank_env().world_size  # torchrun's WORLD_SIZE or srun's SLURM_NTASKS, as launcher.train reads it
    if args.tp != world:
        print(
            f"error: --tp {args.tp} needs exactly {args.tp} processes (torchrun --nproc_per_node {args.tp} "
            f"or srun --ntasks {args.tp}); "
            f"this run has {world}",
            file=sys.stderr,
        )
        return 2

    import torch
    from tqdm import tqdm

    from megafusion.data.latent_cache import CacheOptions, decode_latents, encode_images, load_vae, preprocess
    from megafusion.inference.generate import caption, generate_images, generate_text
    from megafusion.inference.load import load_for_inference
    from megafusion.parallel.placement import PlacementError
    from megafusion.parallel.process_groups import ParallelContext, init_distributed, init_model_parallel

    try:
        init_distributed(device=args.device)
    except PlacementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_model_parallel(args.tp, 1, device=args.device)
    rank0 = torch.distributed.get_rank() == 0
    try:
        loaded = load_for_inference(args.checkpoint, ParallelContext.current(params_dtype=args.dtype))
        tok = _tokenizer(args, loaded)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    model = loaded.model
    img_cfg = model.cfg.image
    dev = next(model.parameters()).device
    vae = load_vae(args.vae, dev) if args.vae else None
    if vae is not None:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae.config.latent_channels != img_cfg.latent_channels or img_cfg.image_size // f != img_cfg.latent_size:
            print(
                f"error: --vae {args.vae}: {vae.config.latent_channels} latent channels, downsampling {f}; the model "
                f"expects {img_cfg.latent_channels} channels of {img_cfg.latent_size} px for {img_cfg.image_size} px "
                "images",
                file=sys.stderr,
            )
            return 1
    out = Path(args.out)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": loaded.source,
        "settings": {k: v for k, v in vars(args).items() if k not in ("prompts", "images", "text")},
        "images": [],
        "captions": [],
        "text": [],
        "edits": [],
    }
    t0 = time.time()
    g = torch.Generator().manual_seed(args.seed)

    if prompts:
        bos = tok.bos_token_id
        pils = []
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            ids = [[bos] + tok(p, add_special_tokens=False)["input_ids"] for p in chunk]
            lat = generate_images(
                model,
                ids,
                num_steps=args.steps,
                sampler=args.sampler,
                guidance_scale=args.guidance if args.guidance > 0 else None,
                generator=g,
                num_train_timesteps=loaded.num_train_timesteps,
                progress=rank0,
                prediction=loaded.prediction,
            )
            pix = decode_latents(vae, lat)
            for p, ids_p, x in zip(chunk, ids, pix):
                pils.append(_to_pil(x))
                k = len(pils) - 1
                record["images"].append(
                    {"prompt": p, "prompt_ids": ids_p, "file": f"image_{k:03d}.png", "index": k, **prompt_ids[k]}
                )
        if rank0:
            _grid(pils, prompts, out / "images.png")
            for k, im in enumerate(pils):
                im.save(out / f"image_{k:03d}.png")

    if args.images:
        from PIL import Image

        opts = CacheOptions(resolution=img_cfg.image_size)
        pics = [Image.open(p).convert("RGB") for p in args.images]
        caps_all = []
        for i in tqdm(range(0, len(pics), args.batch_size), desc="captioning", disable=not rank0):
            x = torch.stack([preprocess(im, img_cfg.image_size) for im in pics[i : i + args.batch_size]])
            lat = encode_images(vae, x, opts)
            caps_all += caption(
                model,
                lat,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_p=args.top_p,
                generator=g,
            )
        texts = [tok.decode(c, skip_special_tokens=True) for c in caps_all]
        record["captions"] = [{"image": p, "ids": c, "caption": t} for p, c, t in zip(args.images, caps_all, texts)]
        if rank0:
            _grid(pics, texts, out / "captions.png")

    if edits:
        from PIL import Image

        from megafusion.inference.editing import edit_image

        opts = CacheOptions(resolution=img_cfg.image_size)
        text_g = args.guidance if args.text_guidance is None else args.text_guidance
        image_g = args.image_guidance if args.image_guidance > 0 and text_g > 0 else None
        sources, edited = [], []
        for i in tqdm(range(0, len(edits), args.batch_size), desc="editing", disable=not rank0):
            chunk = edits[i : i + args.batch_size]
            pics = [Image.open(e["source"]).convert("RGB") for e in chunk]
            lat = encode_images(vae, torch.stack([preprocess(im, img_cfg.image_size) for im in pics]), opts)
            out_lat = edit_image(
                model,
                lat,
                [tok(e["instruction"], add_special_tokens=False)["input_ids"] for e in chunk],
                bos_token_id=tok.bos_token_id,
                num_steps=args.steps,
                sampler=args.sampler,
                text_guidance=text_g if text_g > 0 else None,
                image_guidance=image_g,
                generator=g,
                num_train_timesteps=loaded.num_train_timesteps,
                prediction=loaded.prediction,
            )
            sources += [im.resize((img_cfg.image_size, img_cfg.image_size)) for im in pics]
            edited += [_to_pil(x) for x in decode_latents(vae, out_lat)]
        for k, e in enumerate(edits):
            record["edits"].append({**e, "file": f"edit_{k:03d}.png", "index": k})
        if rank0:
            pairs = [im for pair in zip(sources, edited) for im in pair]
            labels = [lab for e in edits for lab in ("source", e["instruction"])]
            _grid(pairs, labels, out / "edits.png")
            for k, im in enumerate(edited):
                im.save(out / f"edit_{k:03d}.png")
        record["settings"]["text_guidance"], record["settings"]["image_guidance"] = text_g, image_g

    for prompt in args.text:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        new = generate_text(
            model,
            ids,
            args.max_new_tokens,
            args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=tok.eos_token_id,
            generator=g,
        )[0, ids.shape[1] :].tolist()
        record["text"].append({"prompt": prompt, "ids": new, "completion": tok.decode(new, skip_special_tokens=True)})

    record["seconds"] = round(time.time() - t0, 2)
    if rank0:
        from megafusion.durable import write_text

        write_text(out / "samples.json", json.dumps(record, indent=1))
        print(
            f"wrote {out}: {len(record['images'])} images, {len(record['captions'])} captions, "
            f"{len(record['text'])} texts, {len(record['edits'])} edits in {record['seconds']} s"
        )
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
