"""The one-process user API: ``from megafusion import LlamaFusion``.

This module sits above every layer of the library. It is the one place that sets up a
one-rank process group on its own, so a notebook or a script can write
``LlamaFusion.from_hf_llama(path)`` without torchrun; inside an initialised TP group
(torchrun, srun) pass ``pctx=ParallelContext.current()`` and each rank loads only its shard.

:class:`LlamaFusion` is the model of ``megafusion.model.llamafusion`` with the construction
from disk (``checkpoint.build``, ``checkpoint.export``) and generation (``megafusion.inference``)
attached as methods.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megafusion.checkpoint.build import build_llamafusion
from megafusion.checkpoint.export import load_exported
from megafusion.checkpoint.hf_import import model_config_from_hf, read_hf_config
from megafusion.config.schema import ImageConfig, ModelConfig
from megafusion.inference import generate
from megafusion.inference.load import Loaded
from megafusion.inference.load import load_for_inference as _load_for_inference
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext, init_model_parallel


def one_process_context() -> ParallelContext:
    """The parallel context of this process: megatron-core's groups, set up at world size 1 if none exist yet."""
    init_model_parallel(1, 1)
    return ParallelContext.current()


class LlamaFusion(LlamaFusionModel):
    """A LlamaFusion for one process (or one TP rank, given ``pctx``), with loading and generation methods."""

    def __init__(self, cfg: ModelConfig, pctx: ParallelContext | None = None, **kwargs):
        super().__init__(cfg, pctx if pctx is not None else one_process_context(), **kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_llama(
        cls,
        path: str,
        *,
        image: ImageConfig | None = None,
        pctx: ParallelContext | None = None,
        seed: int = 1234,
        **model_overrides,
    ) -> LlamaFusion:
        """Build from a HF Llama directory: text tower loaded (and frozen), image tower a copy.

        In a plain Python process this sets up a one-rank process group itself;
        inside an initialised TP group each rank loads only its shard.
        """
        cfg = model_config_from_hf(read_hf_config(path), image=image, **model_overrides)
        return build_llamafusion(cfg, pctx if pctx is not None else one_process_context(), path, seed=seed, cls=cls)

    @classmethod
    def from_pretrained(cls, path: str, *, pctx: ParallelContext | None = None, seed: int = 1234) -> LlamaFusion:
        """Load a directory written by ``tools/export_hf.py``: the HF text tower plus the trained image side."""
        return load_exported(path, pctx if pctx is not None else one_process_context(), seed=seed, cls=cls)

    # ------------------------------------------------------------------ generation (megafusion.inference)
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False, **kw):
        """[b, s] prompt -> [b, s + n] prompt and new ids (KV cache; greedy, or temperature / top-p sampling)."""
        return generate.generate_text(self, input_ids, max_new_tokens, do_sample, **kw)

    def generate_images(self, prompt_ids, **kw) -> torch.Tensor:
        """Caption ids -> sampled latents [n, C, H, W] (prefix cached across steps; DDIM/DDPM; optional CFG)."""
        return generate.generate_images(self, prompt_ids, **kw)

    def caption(self, latents: torch.Tensor, bos_token_id: int, **kw) -> list[list[int]]:
        """Clean latents [n, C, H, W] -> caption ids per image."""
        return generate.caption(self, latents, bos_token_id, **kw)

    def generate_interleaved(self, input_ids, **kw):
        """One prompt -> (ids with <BOI>/<EOI> where images were made, their latents)."""
        return generate.generate_interleaved(self, input_ids, **kw)


def load_for_inference(path: str | Path, pctx: ParallelContext | None = None) -> Loaded:
    """An exported directory, a checkpoint folder or a save dir with ``latest``, as a :class:`LlamaFusion`
    (``megafusion.inference.load.load_for_inference`` with this module's class and one-process default)."""
    return _load_for_inference(path, pctx if pctx is not None else one_process_context(), cls=LlamaFusion)
