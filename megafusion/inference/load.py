"""Load a LlamaFusion for inference from an exported directory or a training checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megafusion.parallel.process_groups import ParallelContext

if TYPE_CHECKING:
    from megafusion.model.llamafusion import LlamaFusion


@dataclass
class Loaded:
    model: "LlamaFusion"
    num_train_timesteps: int
    tokenizer_dirs: list[str] = field(default_factory=list)  # where a tokenizer may be, in order
    source: str = ""


def load_for_inference(path: str | Path, pctx: Optional[ParallelContext] = None) -> Loaded:
    """``path``: a ``tools/export_hf.py`` directory, a checkpoint folder, or a save dir with ``latest``."""
    from megafusion import LlamaFusion
    from megafusion.checkpoint.export import CONFIG_FILE, load_image_side, read_checkpoint_image_side
    from megafusion.checkpoint.hf_import import load_hf_llama
    from megafusion.training.checkpointing import latest_checkpoint

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        model = LlamaFusion.from_pretrained(str(path), pctx=pctx)
        diffusion = json.loads((path / CONFIG_FILE).read_text()).get("diffusion", {})
        return Loaded(model.eval(), int(diffusion.get("num_timesteps", 1000)), [str(path)], f"exported {path}")
    ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path) if (path / "latest").is_file() else None
    if ckpt is None:
        if (path / "config.json").is_file():
            raise ValueError(f"{path}: a plain Hugging Face Llama without an image tower; sample from a megafusion "
                             "checkpoint or a tools/export_hf.py directory")
        raise FileNotFoundError(f"{path}: neither an exported model ({CONFIG_FILE}) nor a megafusion checkpoint "
                                "(meta.json or a `latest` pointer)")
    full, cfg, meta, hf_dir = read_checkpoint_image_side(ckpt)
    model = LlamaFusion(cfg.model, pctx, seed=cfg.seed)
    load_hf_llama(model, str(hf_dir))
    load_image_side(model, full)
    model.freeze_text_tower()
    dirs = [d for d in (cfg.data.tokenizer, str(hf_dir)) if d]
    return Loaded(model.eval(), cfg.diffusion.num_timesteps, dirs, f"checkpoint {ckpt} (step {meta['step']})")
