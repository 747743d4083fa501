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
from megafusion.inference import editing, generate
from megafusion.inference.load import Loaded
from megafusion.inference.load import load_for_inference as _load_for_inference
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext, init_model_parallel


def one_process_context(params_dtype: str | None = None, device: str = "auto") -> ParallelContext:
    """The parallel context of this process: megatron-core's groups, set up at world size 1 if none exist yet.

    ``params_dtype`` / ``device`` are ``parallel.params_dtype`` / ``parallel.device`` values (None / 'auto':
    bf16 on CUDA, fp32 on the CPU); the device is fixed by the first call of the process.
    """
    init_model_parallel(1, 1, device=device)
    return ParallelContext.current(params_dtype=params_dtype)


def _context(pctx: ParallelContext | None, params_dtype: str | None, device: str) -> ParallelContext:
    if pctx is None:
        return one_process_context(params_dtype, device)
    if params_dtype is not None or device != "auto":
        raise ValueError("pass either pctx or params_dtype/device: a given ParallelContext carries its own")
    return pctx


class LlamaFusion(LlamaFusionModel):
    """A LlamaFusion for one process (or one TP rank, given ``pctx``), with loading and generation methods.

    Every method takes inputs on any device (CPU ids, fp32 latents) and moves them to the model's
    device and dtype; outputs come back on the model's device.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        pctx: ParallelContext | None = None,
        *,
        params_dtype: str | None = None,
        device: str = "auto",
        **kwargs,
    ):
        super().__init__(cfg, _context(pctx, params_dtype, device), **kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_llama(
        cls,
        path: str,
        *,
        image: ImageConfig | None = None,
        pctx: ParallelContext | None = None,
        seed: int = 1234,
        params_dtype: str | None = None,
        device: str = "auto",
        **model_overrides,
    ) -> LlamaFusion:
        """Build from a HF Llama directory: text tower loaded (and frozen), image tower a copy.

        In a plain Python process this sets up a one-rank process group itself (``params_dtype``:
        'bf16' / 'fp32', default bf16 on CUDA and fp32 on the CPU; ``device``: 'cuda' / 'cpu');
        inside an initialised TP group each rank loads only its shard.
        """
        cfg = model_config_from_hf(read_hf_config(path), image=image, **model_overrides)
        return build_llamafusion(cfg, _context(pctx, params_dtype, device), path, seed=seed, cls=cls)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        pctx: ParallelContext | None = None,
        seed: int = 1234,
        params_dtype: str | None = None,
        device: str = "auto",
    ) -> LlamaFusion:
        """Load a directory written by ``tools/export_hf.py``: the HF text tower plus the trained image side."""
        return load_exported(path, _context(pctx, params_dtype, device), seed=seed, cls=cls)

    # ------------------------------------------------------------------ generation (megafusion.inference)
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False, **kw):
        """[b, s] prompt -> [b, s + n] prompt and new ids (KV cache; greedy, or temperature / top-p sampling)."""
        return generate.generate_text(self, input_ids, max_new_tokens, do_sample, **kw)

    def generate_images(self, prompt_ids, **kw) -> torch.Tensor:
        """Caption ids -> sampled latents [n, C, H, W] (prefix cached across steps; DDIM/DDPM; optional CFG)."""
        return generate.generate_images(self, prompt_ids, **kw)

    def caption(self, latents: torch.Tensor | None, bos_token_id: int, **kw) -> list[list[int]]:
        """Clean latents [n, C, H, W] -> caption ids per image; from a LLaVA, ``caption(None, bos,
        pixel_values=..., prompt_ids=...)`` captions pictures through its frozen vision path."""
        return generate.caption(self, latents, bos_token_id, **kw)

    def edit_image(self, source_latents: torch.Tensor, instruction_ids, bos_token_id: int, **kw) -> torch.Tensor:
        """Clean source latents [n, C, H, W] + an instruction per source -> edited latents (the prefix cached
        across denoising steps; ``text_guidance`` / ``image_guidance``: InstructPix2Pix-style guidance)."""
        return editing.edit_image(self, source_latents, instruction_ids, bos_token_id, **kw)

    def generate_interleaved(self, input_ids, **kw):
        """One prompt -> (ids with <BOI>/<EOI> where images were made, their latents)."""
        return generate.generate_interleaved(self, input_ids, **kw)


def load_for_inference(
    path: str | Path, pctx: ParallelContext | None = None, *, params_dtype: str | None = None, device: str = "auto"
) -> Loaded:
    """An exported directory, a checkpoint folder or a save dir with ``latest``, as a :class:`LlamaFusion`
    (``megafusion.inference.load.load_for_inference`` with this module's class and one-process default)."""
    return _load_for_inference(path, _context(pctx, params_dtype, device), cls=LlamaFusion)
