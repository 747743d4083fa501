"""megafusion training checkpoint -> a Hugging Face directory plus the image side.

The output directory is what ``transformers.LlamaForCausalLM.from_pretrained``
loads (the text tower: the base Llama's files, copied bit for bit, since the
text tower never trains) and, beside it, ``megafusion_image.safetensors`` (image
tower, U-Nets, <BOI>/<EOI> rows, in full, layout-independent form) and
``megafusion_config.json`` (the model config), which
``LlamaFusion.from_pretrained(DIR)`` loads back at any TP size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megafusion.checkpoint.build import M, build_llamafusion
from megafusion.checkpoint.files import CheckpointError, frozen_source_fingerprint, read_checkpoint_files, verify_file
from megafusion.checkpoint.gather import canonical_name, shard, unshard
from megafusion.checkpoint.shapes import dim_conflicts, index_shape_problems
from megafusion.config.loader import config_from_dict
from megafusion.config.schema import Config
from megafusion.durable import publish
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext

IMAGE_FILE = "megafusion_image.safetensors"
CONFIG_FILE = "megafusion_config.json"
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def open_checkpoint(ckpt_dir: str | Path) -> tuple[Config, dict, dict, Path]:
    """(config, meta.json, index.json, base Llama dir) of a training checkpoint, the base Llama checked."""
    ckpt = Path(ckpt_dir)
    meta, index, cfg = read_checkpoint_files(ckpt)
    bad = index_shape_problems(cfg.model, index, int(meta["layout"]["tp"]))
    if bad:
        raise CheckpointError(f"{ckpt}: its config.yaml does not describe its weights: " + "; ".join(bad))
    src = meta.get("frozen_source", {})
    hf_dir = Path(src.get("path", ""))
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: the base Llama {hf_dir} it was trained from is not available")
    if frozen_source_fingerprint(hf_dir)["files"] != src.get("files"):
        raise CheckpointError(f"{hf_dir} differs from the base Llama recorded in {ckpt / 'meta.json'}")
    bad = dim_conflicts(cfg.model, hf_dir, source=str(ckpt / "config.yaml"))
    if bad:
        raise CheckpointError("; ".join(bad))
    return cfg, meta, index, hf_dir


def read_checkpoint_image_side(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict, Path]:
    """A training checkpoint's image side as full tensors, with its config, meta.json and base Llama dir.

    Every model shard is verified against index.json; the base Llama must be the one recorded.
    """
    ckpt = Path(ckpt_dir)
    cfg, meta, index, hf_dir = open_checkpoint(ckpt)
    shards: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for rel in sorted(k for k in index if k.startswith("model/")):
        verify_file(ckpt, rel, index)
        tp_rank = int(rel.split("/")[1].split("_")[0][2:])  # model/tp{t}_pp{p}.safetensors
        for name, t in load_file(str(ckpt / rel)).items():
            canon = canonical_name(name)
            if canon is not None:
                shards[canon][tp_rank] = t
    full = {name: unshard(name, [by_rank[r] for r in sorted(by_rank)], cfg.model) for name, by_rank in shards.items()}
    return full, cfg, meta, hf_dir


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, log=print) -> Path:
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    full, cfg, meta, hf_dir = read_checkpoint_image_side(ckpt)
    if cfg.model.architecture != "llamafusion":
        raise CheckpointError(
            f"{ckpt}: a {cfg.model.architecture} checkpoint trains its text tower, which the export "
            "(the base Llama's files, copied) cannot hold; sample and evaluate the checkpoint itself"
        )

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in sorted(hf_dir.iterdir()):
        if f.name in _HF_FILES or f.name.startswith("model-") or f.name.startswith("tokenizer"):
            shutil.copy2(f, tmp / f.name)
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / IMAGE_FILE))
    (tmp / CONFIG_FILE).write_text(
        json.dumps(
            {
                "model": dataclasses.asdict(cfg.model),
                "diffusion": dataclasses.asdict(cfg.diffusion),
                "step": meta["step"],
                "source_checkpoint": str(ckpt),
            },
            indent=1,
        )
    )
    publish(tmp, out)
    log(f"[export] {len(full)} image-side tensors + text tower from {hf_dir} -> {out}")
    return out


@torch.no_grad()
def load_image_side(model, source: str | Path | dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the full trained tensors (a file or a dict) into ``model`` (any TP size).

    The image side for the recipe; every weight for the Transfusion baseline (``model.trains``).
    """
    path = source if not isinstance(source, dict) else "image side"
    tensors = load_file(str(source)) if not isinstance(source, dict) else source
    cfg, tp, rank = model.cfg, model.pctx.tp_size, model.pctx.tp_rank
    for name, p in model.named_parameters():
        if not model.trains(name):
            continue
        if name not in tensors:
            raise CheckpointError(f"{path}: no tensor {name!r} (exported from a different model config?)")
        local = shard(name, tensors[name], cfg, tp, rank)
        if tuple(local.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{path}: {name} gives a shard of {tuple(local.shape)}, the model has {tuple(p.shape)}"
            )
        p.copy_(local.to(dtype=p.dtype, device=p.device))


def load_exported(path: str | Path, pctx: ParallelContext, *, seed: int = 1234, cls: type[M] = LlamaFusionModel) -> M:
    """A ``tools/export_hf.py`` directory as a model on this rank (any TP size): the HF text tower plus the
    trained image side."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(
            f"{path}: no {CONFIG_FILE}, so no trained image tower; for a plain HF Llama use LlamaFusion.from_hf_llama"
        )
    mcfg = config_from_dict({"model": json.loads(cfg_file.read_text())["model"]}).model
    model = build_llamafusion(mcfg, pctx, path, seed=seed, cls=cls)
    load_image_side(model, path / IMAGE_FILE)
    return model
