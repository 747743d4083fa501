"""The one builder of a LlamaFusion from a Hugging Face Llama: every path that makes a model goes here.

``megafusion.LlamaFusion.from_hf_llama`` / ``from_pretrained``, the training stages, inference loading
and (for the U-Nets, through ``model.image_io.build_image_io``) the converter all make their models
the same way, so "same seed, same order, same freezing" is this code, not a convention:

1. the module for this rank: its TP shard of the layers ``layer_ids``, the embedding / U-Net
   down-sampler on the first stage, the LM head / U-Net up-sampler on the last, the U-Nets
   initialised from ``seed``;
2. the text tower loaded from the HF directory (only this rank's slices); from a LLaVA directory
   also its vision tower and projector (frozen, whole on every rank: LLaVA-Fusion);
3. the image tower set to a copy of the text tower (the recipe's initialisation);
4. the text tower frozen (nothing in the Transfusion-style baseline, which trains every weight).

Trained weights, when there are any, are loaded on top by the caller (an export, a checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from megafusion.checkpoint.hf_import import load_hf_llama, read_hf_config, vision_spec_from_hf
from megafusion.config.schema import ModelConfig
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext

M = TypeVar("M", bound=LlamaFusionModel)


def build_llamafusion(
    cfg: ModelConfig,
    pctx: ParallelContext,
    hf_dir: str | Path,
    *,
    seed: int,
    layer_ids: Sequence[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    pipeline_parallel: int = 1,
    cls: type[M] = LlamaFusionModel,
) -> M:
    """This rank's LlamaFusion (or pipeline stage of it) with the base Llama loaded, image tower copied, text frozen."""
    model = cls(
        cfg,
        pctx,
        pre_process=pre_process,
        post_process=post_process,
        layer_ids=layer_ids,
        seed=seed,
        pipeline_parallel=pipeline_parallel,
        vision=vision_spec_from_hf(read_hf_config(hf_dir)),
    )
    load_hf_llama(model, hf_dir)
    model.init_image_tower_from_text()
    model.freeze_text_tower()
    return model
