"""Load a LlamaFusion for inference from an exported directory or a training checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megafusion.checkpoint.build import M, build_llamafusion
from megafusion.checkpoint.export import (
    CONFIG_FILE,
    load_exported,
    load_image_side,
    open_checkpoint,
    read_checkpoint_image_side,
)
from megafusion.checkpoint.files import CheckpointError, latest_checkpoint
from megafusion.checkpoint.source import CheckpointSource, read_local, verify_read
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
    if cfg.model.architecture == "llamafusion":
        load_own_slices(model, ckpt)  # any saved layout: each rank reads only its own bytes
    else:  # the baseline's trained vocab-parallel tensors are re-padded per TP size: assembled in full
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


@torch.no_grad()
def load_own_slices(model: LlamaFusionModel, ckpt: Path) -> None:
    """Every trained parameter of this rank, read from a checkpoint saved at any TP x PP layout.

    Each parameter's shard at this rank's TP size is planned as byte runs of the saved shards
    (``CheckpointSource.runs``, the resharder's planner) and read with one pread per run: no rank
    assembles the full image side, and peak memory is one parameter's shard. The files read are
    then verified against ``index.json`` (checksums, in parallel).
    """
    src = CheckpointSource(ckpt, verify=False, with_optimizer=False)
    try:
        params = {n: p for n, p in model.named_parameters() if model.trains(n)}
        if set(src.model) != set(params):
            raise CheckpointError(
                f"{ckpt}: trained parameters differ from the model's, e.g. {sorted(set(src.model) ^ set(params))[:3]}"
            )
        tp, rank = model.pctx.tp_size, model.pctx.tp_rank
        for name, p in params.items():
            local = read_local(src, name, tp, rank)
            if tuple(local.shape) != tuple(p.shape):
                raise CheckpointError(f"{ckpt}: {name} has a shard of {tuple(local.shape)}, model {tuple(p.shape)}")
            p.copy_(local.to(dtype=p.dtype, device=p.device))
        verify_read(src)
    finally:
        src.close()
