"""Load a LlamaFusion for inference from an exported directory or a training checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from megafusion.checkpoint.build import M, build_llamafusion
from megafusion.checkpoint.export import (
    CONFIG_FILE,
    load_exported,
    load_image_side,
    open_checkpoint,
    read_checkpoint_image_side,
)
from megafusion.checkpoint.files import CheckpointError, latest_checkpoint, verify_file
from megafusion.checkpoint.gather import canonical_name
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext


@dataclass
class Loaded:
    model: LlamaFusionModel
    num_train_timesteps: int
    prediction: str  # diffusion.prediction the model was trained with
    tokenizer_dirs: list[str] = field(default_factory=list)  # where a tokenizer may be, in order
    source: str = ""


def load_for_inference(path: str | Path, pctx: ParallelContext, cls: type[M] = LlamaFusionModel) -> Loaded:
    """``path``: a ``tools/export_hf.py`` directory, a checkpoint folder, or a save dir with ``latest``.

    ``megafusion.api.load_for_inference`` is the one-process form (it sets up the group and returns
    the API's ``LlamaFusion`` with its generation methods).
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        model = load_exported(path, pctx, cls=cls)
        diffusion = json.loads((path / CONFIG_FILE).read_text()).get("diffusion", {})
        return Loaded(
            model.eval(),
            int(diffusion.get("num_timesteps", 1000)),
            diffusion.get("prediction", "epsilon"),
            [str(path)],
            f"exported {path}",
        )
    ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path) if (path / "latest").is_file() else None
    if ckpt is None:
        if (path / "config.json").is_file():
            raise ValueError(
                f"{path}: a plain Hugging Face Llama without an image tower; sample from a megafusion "
                "checkpoint or a tools/export_hf.py directory"
            )
        raise FileNotFoundError(
            f"{path}: neither an exported model ({CONFIG_FILE}) nor a megafusion checkpoint "
            "(meta.json or a `latest` pointer)"
        )
    cfg, meta, index, hf_dir = open_checkpoint(ckpt)
    model = build_llamafusion(cfg.model, pctx, hf_dir, seed=cfg.seed, cls=cls)
    lay = meta["layout"]
    if lay.get("pp", 1) == 1 and lay.get("vpp", 1) == 1 and lay["tp"] == model.pctx.tp_size:
        _load_own_shard(model, ckpt, index)  # this rank's file only: no full copy of the image side
    else:  # another layout: every rank assembles the full trained side once (reshard first for big models)
        full, _, _, _ = read_checkpoint_image_side(ckpt)
        load_image_side(model, full)
    model.requires_grad_(False)  # inference: no autograd graphs (the baseline's weights all train otherwise)
    dirs = [d for d in (cfg.data.tokenizer, str(hf_dir)) if d]
    return Loaded(
        model.eval(),
        cfg.diffusion.num_timesteps,
        cfg.diffusion.prediction,
        dirs,
        f"checkpoint {ckpt} (step {meta['step']})",
    )


def _load_own_shard(model: LlamaFusionModel, ckpt: Path, index: dict) -> None:
    """Copy ``model/tp{rank}_pp0.safetensors`` (every trained parameter) into the model (saved at this TP, PP=1)."""
    rel = f"model/tp{model.pctx.tp_rank}_pp0.safetensors"
    verify_file(ckpt, rel, index)
    saved = {canonical_name(k): v for k, v in load_file(str(ckpt / rel)).items() if canonical_name(k)}
    params = {n: p for n, p in model.named_parameters() if model.trains(n)}
    if set(saved) != set(params):
        raise CheckpointError(
            f"{ckpt / rel}: trained parameters differ from the model's, e.g. {sorted(set(saved) ^ set(params))[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{ckpt / rel}: {name} has shape {tuple(saved[name].shape)}, model {tuple(p.shape)}"
                )
            p.copy_(saved[name].to(dtype=p.dtype, device=p.device))
