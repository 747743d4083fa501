"""LlamaFusion: a frozen Llama text tower beside a trainable image tower, sharing attention.

``model.architecture='transfusion'`` builds the paper's baseline from the same code:
one tower, used by text and image tokens alike, every weight trained.

The module is pipeline-stage friendly: ``pre_process`` owns the text embedding,
the <BOI>/<EOI> embeddings and the image down-sampler; ``post_process`` owns the
final norm, the LM head and the image up-sampler; ``layer_ids`` picks which
transformer layers this stage holds (a ``ModuleDict`` keyed by global index).
The residual stream between stages is [s_local, b, h] (megatron-core layout).

Text enters through the frozen Llama embedding and leaves through the frozen LM
head. <BOI>/<EOI> (Llama-3 reserved special tokens) use a separate trainable
2-row embedding initialised from the Llama rows, because the base model never
trained those rows and the text table stays frozen; their LM-head rows stay
frozen (no loss is taken on <BOI>).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megafusion.config.schema import ModelConfig
from megafusion.model.attention_core import AttentionMask
from megafusion.model.batch import FusionBatch
from megafusion.model.image_io import build_image_io
from megafusion.model.layer import FusionLayer, LayerInputs
from megafusion.model.mask import hybrid_attention_mask
from megafusion.model.norm import RMSNorm
from megafusion.model.rope import rope_cos_sin, rope_inv_freq
from megafusion.model.routed_linear import RoutedColumnParallelLinear, RoutedRowParallelLinear, no_init
from megafusion.model.routing import RoutePlan, Routes
from megafusion.model.vision_tower import VisionPath, VisionSpec
from megafusion.parallel.megatron_config import megatron_transformer_config, padded_vocab_size
from megafusion.parallel.process_groups import ParallelContext

if TYPE_CHECKING:
    from megafusion.model.kv_cache import KVCache


@dataclass
class FusionOutput:
    lm_loss_sum: torch.Tensor
    """Sum of per-token LM cross-entropy over loss_mask (0 if no labels)."""
    lm_tokens: torch.Tensor
    """Number of tokens in lm_loss_sum."""
    image_pred: torch.Tensor | None
    """[n_img, C, H, W] predicted noise (None without images)."""

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)


@dataclass
class ForwardState:
    """Per-micro-batch state every stage derives from the batch (cheap, no parameters)."""

    inputs: LayerInputs
    is_image: torch.Tensor  # [s*b] bool, sequence-major


class LlamaFusionModel(nn.Module):
    """The model math on one rank: its TP shard of the layers ``layer_ids`` of one pipeline stage.

    Takes its parallel context and creates no process group (``megafusion.LlamaFusion`` sets up a
    one-rank group for one-process use). Weights are not loaded here: ``checkpoint.build`` does that.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        pctx: ParallelContext,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layer_ids: Sequence[int] | None = None,
        seed: int = 1234,
        pipeline_parallel: int = 1,
        vision: VisionSpec | None = None,
    ):
        super().__init__()
        if cfg.architecture == "transfusion" and cfg.tie_word_embeddings:
            raise ValueError(
                "model.architecture=transfusion with a tied-embedding Llama (tie_word_embeddings): the "
                "embedding and LM head are separate parameters here and would train apart"
            )
        self.cfg, self.pctx = cfg, pctx
        self.pre_process, self.post_process = pre_process, post_process
        self.every_param_in_graph = False  # set for ZeRO-2 training (training/stages.py, Routes.with_full_graph)
        dtype = pctx.params_dtype  # parallel.params_dtype, resolved in parallel/placement.py
        self.params_dtype = dtype
        self.config = megatron_transformer_config(cfg, pctx, dtype, pipeline_parallel)
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, pctx.tp_size)
        device = pctx.device
        h, img = cfg.hidden_size, cfg.image

        # Replicated (non-TP) trainable modules: every TP rank, and every TP size, starts from identical weights.
        image_in, image_out = build_image_io(img, h, cfg.rms_norm_eps, seed)
        if pre_process:
            self.embedding = VocabParallelEmbedding(
                self.padded_vocab, h, init_method=no_init, config=self.config, tp_group=pctx.tp_group
            )
            self.special_embedding = nn.Parameter(torch.zeros(2, h, dtype=dtype, device=device))
            self.image_in = image_in.to(device=device, dtype=dtype)
            # LLaVA-Fusion: the VLM's frozen vision path, replicated on every TP rank (model/vision_tower.py)
            self.vision = None if vision is None else VisionPath(vision).to(device=device, dtype=dtype)
        self.vision_spec = vision
        if vision is not None:
            _check_vision(cfg, vision)
        ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleDict({str(i): FusionLayer(cfg, self.config, pctx, layer_id=i) for i in ids})
        if post_process:
            self.final_norm = RMSNorm(h, cfg.rms_norm_eps, dtype).to(device)
            # under SP it normalises this rank's tokens: partial grads, summed over TP (parallel/grads.py)
            self.final_norm.weight.sequence_parallel = pctx.sequence_parallel
            self.lm_head = ColumnParallelLinear(
                h,
                self.padded_vocab,
                config=self.config,
                init_method=no_init,
                bias=False,
                gather_output=False,
                skip_bias_add=True,
                disable_grad_reduce=True,
                tp_group=pctx.tp_group,
            )
            self.image_out = image_out.to(device=device, dtype=dtype)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.activation_checkpointing = False
        # megatron-core allocates its shards on the GPU itself; routed norms, buffers and the
        # replicated modules follow them there (a no-op on CPU).
        self.to(device)
        for lin in (getattr(self, "embedding", None), getattr(self, "lm_head", None)):
            if lin is not None and not hasattr(lin.weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(lin.weight, True, 0, 1)

    # ------------------------------------------------------------------ construction
    def routed_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (RoutedColumnParallelLinear, RoutedRowParallelLinear))]

    @torch.no_grad()
    def init_image_tower_from_text(self) -> None:
        """Image tower Q/K/V/O/FFN/norms := copies of the text tower (the recipe's init).

        The Transfusion baseline has no image tower: its image tokens use the text weights.
        """
        if not self.shared_tower:
            for m in self.routed_modules():
                m.image.weight.copy_(m.text.weight)
                norm = getattr(m, "norm", None)
                if norm is not None:
                    norm.image.copy_(norm.text)
        if self.post_process and hasattr(self.image_out, "norm_in"):
            self.image_out.norm_in.weight.copy_(self.final_norm.weight)

    @property
    def shared_tower(self) -> bool:
        """One tower for text and image tokens (``model.architecture='transfusion'``, the paper's baseline)."""
        return self.cfg.architecture == "transfusion"

    def trains(self, name: str) -> bool:
        """Does parameter ``name`` train (and live in checkpoints)? The image side under the recipe; everything
        in the Transfusion baseline, whose text tower is not kept."""
        if name.startswith("vision."):  # a LLaVA's vision path never trains, not even in the baseline
            return False
        return self.shared_tower or not is_text_tower_param(name)

    def freeze_text_tower(self) -> None:
        """requires_grad=False on everything the base Llama owns (in the Transfusion baseline only a LLaVA's
        vision path)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.trains(name))

    @torch.no_grad()
    def init_random_text_tower(self, std: float | None = None, seed: int = 0) -> None:
        """Random text tower (tests and from-scratch runs); shards of one rank only, not TP-consistent."""
        std = self.cfg.init_std if std is None else std
        g = torch.Generator().manual_seed(seed + 7919 * self.pctx.tp_rank)
        for name, p in self.named_parameters():
            if not is_text_tower_param(name):
                continue
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)

    # ------------------------------------------------------------------ per micro-batch (every stage)
    def prepare(self, batch: FusionBatch, kv_cache: KVCache | None = None) -> ForwardState:
        """Routes, mask and RoPE tables for one micro-batch (every stage computes them).

        With ``kv_cache`` (inference) the batch holds only the new tokens: the mask is
        their rows against the cached keys then themselves (the same hybrid rule).
        Routes come from ``batch.route_plan`` when the batch carries one (training batches: the
        loader built it on the CPU), so no size is read back from the device; else they are built
        here by the same code, with the syncs that needs.
        """
        batch = batch.with_defaults()
        b, s = batch.input_ids.shape
        is_image = (batch.image_ids >= 0).t().reshape(-1)  # [s*b] sequence-major
        plan = batch.route_plan
        if plan is None:  # inference and user batches: build it here (reads sizes back from the device)
            plan = RoutePlan.build(batch.image_ids)
        elif plan.batch_shape != (b, s):
            raise ValueError(f"FusionBatch.route_plan was built for a {plan.batch_shape} batch, this one is {(b, s)}")
        routes = plan.routes(self.pctx.sequence_parallel, self.pctx.tp_size, self.pctx.tp_rank, is_image)
        if self.every_param_in_graph and torch.is_grad_enabled():
            routes = routes.with_full_graph()  # ZeRO-2: image-side modules run on empty slices (Routes docstring)
        if kv_cache is None:
            mask = AttentionMask.build(batch.document_ids, batch.image_ids, self.cfg.attention_backend)
        else:
            doc, img = kv_cache.key_ids(batch.document_ids, batch.image_ids)  # [b, s_past + s]
            mask = AttentionMask("sdpa", dense=hybrid_attention_mask(doc, img, query_offset=kv_cache.length))
        cos, sin = rope_cos_sin(batch.position_ids, self.inv_freq, self.params_dtype)
        return ForwardState(LayerInputs(routes, mask, cos, sin, s, b, kv_cache), is_image)

    def embed(self, batch: FusionBatch, state: ForwardState) -> tuple[torch.Tensor, list | None]:
        """Text embeddings + image tokens -> residual stream [s_local, b, h] and U-Net skips."""
        batch = batch.with_defaults()
        b, s = batch.input_ids.shape
        is_img = batch.image_ids >= 0
        ids = torch.where(is_img, torch.zeros_like(batch.input_ids), batch.input_ids).t()  # [s, b]
        x = self.embedding(ids)  # [s, b, h], all-reduced over TP
        sp = self.special_embedding.to(x.dtype)
        x = torch.where((ids == self.cfg.boi_token_id)[..., None], sp[0], x)
        x = torch.where((ids == self.cfg.eoi_token_id)[..., None], sp[1], x)
        if batch.pixel_values is not None:
            x = self._with_vision_features(x, batch)
        x = x.reshape(s * b, -1)  # [N, h]
        skips = None
        routes = state.inputs.routes
        if routes.full.num_image or routes.full.full_graph:  # (full_graph: no image -> an empty U-Net pass)
            latents, timesteps = self._image_inputs(batch, x)
            tokens, skips = self.image_in(latents, timesteps)  # [n_img, T, h]
            text, _ = routes.full.split(x)
            x = routes.full.merge((text, tokens.reshape(-1, tokens.shape[-1])))
        x = x.view(s, b, -1)
        if self.pctx.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.pctx.tp_group)  # [s/tp, b, h]
        return x, skips

    def _with_vision_features(self, x: torch.Tensor, batch: FusionBatch) -> torch.Tensor:
        """[s, b, h] embeddings with each ``<image>`` placeholder replaced by the frozen VLM's features.

        The features fill the placeholders in row-major [b, s] order, image by image (transformers'
        ``masked_scatter``); those positions stay text positions (text tower, causal), as in the VLM.
        """
        if self.vision is None:
            raise ValueError(
                "FusionBatch.pixel_values given, but this model has no vision tower "
                "(it was built from a text-only Llama, not a LLaVA)"
            )
        feats = self.vision(batch.pixel_values)  # [n, P, h]
        holders = ((batch.input_ids == self.vision_spec.image_token_id) & (batch.image_ids < 0)).unsqueeze(-1)
        if batch.route_plan is None:  # user batches (loader batches were counted where they were packed)
            n_hold, n_feat = int(holders.sum()), feats.shape[0] * feats.shape[1]
            if n_hold != n_feat:
                raise ValueError(
                    f"input_ids hold {n_hold} <image> placeholders (id {self.vision_spec.image_token_id}) but "
                    f"pixel_values gives {feats.shape[0]} pictures x {feats.shape[1]} features = {n_feat}"
                )
        xb = x.transpose(0, 1)  # [b, s, h]
        xb = xb.masked_scatter(holders, feats.to(x.dtype).reshape(-1, x.shape[-1]))
        return xb.transpose(0, 1)  # [s, b, h]

    def run_layers(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        for layer in self.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled():
                # recompute the layer in backward (its TP collectives run again, on every rank alike)
                x = torch.utils.checkpoint.checkpoint(layer, x, state.inputs, use_reentrant=False)
            else:
                x = layer(x, state.inputs)
        return x

    def _post_inputs(self, x: torch.Tensor, routes: Routes) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final residual stream -> (final-normed text rows for the LM head, image rows for the up-sampler).

        The final norm runs before the tensor-parallel region of the LM head, so its weight
        gets whole gradients (it trains in the Transfusion baseline); under sequence
        parallelism it normalises this rank's tokens and is summed over TP like the other norms.
        """
        x = x.reshape(-1, x.shape[-1])
        g = self.pctx.tp_group
        if self.pctx.sequence_parallel:
            # LM head is column-parallel: its input grads are partial -> reduce-scatter back.
            text, _ = routes.full.split(gather_from_sequence_parallel_region(self.final_norm(x), True, group=g))
            # The up-sampler is replicated: every rank has the full grad -> just split back.
            _, image = routes.full.split(gather_from_sequence_parallel_region(x, False, group=g))
        else:
            text, image = routes.full.split(x)
            if text is not None:
                text = copy_to_tensor_model_parallel_region(self.final_norm(text), group=g)
        return text, image

    def _vocab_logits(self, text_normed: torch.Tensor) -> torch.Tensor:
        """Final-normed text rows [Nt, h] -> this rank's vocab shard of logits [Nt, V_pad / tp], padding at -inf."""
        logits = F.linear(text_normed, self.lm_head.weight)
        per = self.padded_vocab // self.pctx.tp_size
        start = self.pctx.tp_rank * per
        if start + per > self.cfg.vocab_size:
            pad = torch.arange(start, start + per, device=logits.device) >= self.cfg.vocab_size
            logits = logits.masked_fill(pad, float("-inf"))
        return logits

    def heads(self, x: torch.Tensor, batch: FusionBatch, state: ForwardState, skips: list | None) -> FusionOutput:
        routes = state.inputs.routes
        text, image = self._post_inputs(x, routes)
        zero = x.new_zeros(())
        loss_sum, count = zero, torch.zeros((), dtype=torch.long, device=x.device)
        if batch.labels is not None and text is not None:
            labels_t, _ = routes.full.split(batch.labels.t().reshape(-1))
            mask = batch.loss_mask if batch.loss_mask is not None else torch.ones_like(batch.labels, dtype=x.dtype)
            mask_t, _ = routes.full.split(mask.t().reshape(-1).to(x.dtype))
            logits = self._vocab_logits(text)
            safe = torch.where(mask_t > 0, labels_t, torch.zeros_like(labels_t))
            per_tok = vocab_parallel_cross_entropy(logits.float().unsqueeze(1), safe.unsqueeze(1)).squeeze(1)
            loss_sum = (per_tok * mask_t.float()).sum()
            count = (mask_t > 0).sum()
        pred = None
        if image is not None:
            n, T = batch.num_images, self.cfg.image.tokens_per_image
            _, timesteps = self._image_inputs(batch, x)
            pred = self.image_out(image.reshape(n, T, image.shape[-1]), timesteps, skips)  # n may be 0: full_graph
        return FusionOutput(loss_sum, count, pred)

    def _image_inputs(self, batch: FusionBatch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents in x's dtype, timesteps) of the batch; empty [0, C, H, W] / [0] when it has none (full_graph)."""
        if batch.latents is not None:
            return batch.latents.to(x.dtype), batch.timesteps
        img = self.cfg.image
        empty = x.new_zeros(0, img.latent_channels, img.latent_size, img.latent_size)
        return empty, torch.zeros(0, dtype=torch.long, device=x.device)

    # ------------------------------------------------------------------ whole model on one stage
    @property
    def device(self) -> torch.device:
        """Where this rank's parameters live (``parallel.device``)."""
        return self.pctx.device

    def _placed(self, batch: FusionBatch) -> FusionBatch:
        """The batch on the model's device, ids as int64 and latents in the parameter dtype.

        The whole-model entry points take inputs as a user has them (CPU ids, fp32 latents from a VAE);
        the pipeline-stage methods get batches the trainer already placed.
        """
        batch = batch.to(self.device)
        batch.input_ids = batch.input_ids.long()
        if batch.latents is not None:
            batch.latents = batch.latents.to(self.params_dtype)
        return batch

    def forward(self, batch: FusionBatch, check: bool = True) -> FusionOutput:
        """Whole model on one pipeline stage: batch -> LM loss and predicted noise."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward() needs the whole model; pipeline stages use embed/run_layers/heads")
        batch = self._placed(batch)
        if check:
            img = self.cfg.image
            batch.check(img.tokens_per_image, (img.latent_channels, img.latent_size, img.latent_size))
        b, s = batch.input_ids.shape
        if self.pctx.sequence_parallel and s % self.pctx.tp_size:
            raise ValueError(
                f"sequence length {s} must be divisible by TP={self.pctx.tp_size} under sequence parallelism"
            )
        state = self.prepare(batch)
        x, skips = self.embed(batch, state)
        x = self.run_layers(x, state)
        return self.heads(x, batch, state, skips)

    def text_logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[b, s] text-only ids -> full-vocabulary logits [b, s, vocab] (gathered over TP).

        ``pixel_values`` [n, 3, H, W] (LLaVA-Fusion): pictures whose frozen VLM features fill the ``<image>``
        placeholders of ``input_ids``, the VLM's understanding input (its logits, exactly).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {self.cfg.vocab_size}); "
                f"got [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        input_ids = input_ids.to(self.device, torch.long)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        b, s = input_ids.shape
        if self.pctx.sequence_parallel and s % self.pctx.tp_size:
            raise ValueError(
                f"sequence length {s} must be divisible by the tensor-parallel size {self.pctx.tp_size} "
                "under sequence parallelism (pad the input)"
            )
        batch = FusionBatch.text_only(input_ids)
        batch.position_ids = position_ids
        if pixel_values is not None:
            batch.pixel_values = pixel_values.to(self.device)
        state = self.prepare(batch)
        x, _ = self.embed(batch, state)
        x = self.run_layers(x, state)
        text, _ = self._post_inputs(x, state.inputs.routes)
        logits = gather_from_tensor_model_parallel_region(self._vocab_logits(text), group=self.pctx.tp_group)
        logits = logits[:, : self.cfg.vocab_size]  # [s*b, V]
        return logits.view(s, b, -1).transpose(0, 1)  # [b, s, V]

    @torch.no_grad()
    def forward_cached(
        self, batch: FusionBatch, kv_cache: KVCache, logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """New tokens against a KV cache -> (logits of each row's last token [b, vocab], predicted noise).

        ``batch`` holds only the new tokens, with explicit ``position_ids`` and
        ``document_ids`` continuing the cached ones; its images (latents + timesteps)
        go through the U-Nets as in training. The cache is extended unless it is
        ``frozen``. Logits are gathered over TP, so every rank samples the same token.
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("cached inference needs the whole model on one pipeline stage (PP=1)")
        if self.pctx.sequence_parallel:
            raise ValueError("cached inference runs without sequence parallelism; build the model with it off")
        batch = self._placed(batch).with_defaults()
        state = self.prepare(batch, kv_cache)
        x, skips = self.embed(batch, state)
        x = self.run_layers(x, state)  # [s, b, h]
        kv_cache.commit(batch.document_ids, batch.image_ids)
        out_logits = None
        if logits:
            last = self._vocab_logits(self.final_norm(x[-1]))  # [b, V_pad / tp]
            out_logits = gather_from_tensor_model_parallel_region(last, group=self.pctx.tp_group)[
                :, : self.cfg.vocab_size
            ]
        pred = None
        routes = state.inputs.routes
        if routes.full.num_image:
            _, image = routes.full.split(x.reshape(-1, x.shape[-1]))
            pred = self.image_out(image.reshape(batch.num_images, -1, image.shape[-1]), batch.timesteps, skips)
        return out_logits, pred

    def forward_embeddings(
        self,
        inputs_embeds: torch.Tensor,
        image_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the layers on given input embeddings [b, s, h]; tokens with image_ids >= 0 use the
        image tower. Returns the last layer's output [b, s, h] (before the final norm)."""
        b, s, h = inputs_embeds.shape
        inputs_embeds = inputs_embeds.to(self.device, self.params_dtype)
        batch = FusionBatch(
            input_ids=torch.zeros(b, s, dtype=torch.long, device=self.device),
            image_ids=image_ids,
            position_ids=position_ids,
            document_ids=document_ids,
        ).to(self.device)
        state = self.prepare(batch)
        x = inputs_embeds.transpose(0, 1).contiguous()  # [s, b, h]
        if self.pctx.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.pctx.tp_group)
        x = self.run_layers(x, state)
        if self.pctx.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, False, group=self.pctx.tp_group)
        return x.transpose(0, 1)


_TEXT_TOWER_PREFIXES = ("embedding.", "final_norm.", "lm_head.", "vision.")  # vision.: a LLaVA's, frozen too


def _check_vision(cfg: ModelConfig, v: VisionSpec) -> None:
    """The VLM's vision path must fit the text tower it feeds, and its placeholder must not be <BOI>/<EOI>."""
    if v.text_hidden_size != cfg.hidden_size:
        raise ValueError(
            f"the LLaVA projector outputs {v.text_hidden_size} features, model.hidden_size={cfg.hidden_size}"
        )
    if not 0 <= v.image_token_id < cfg.vocab_size:
        raise ValueError(
            f"the LLaVA's image_token_id {v.image_token_id} lies outside its vocabulary of {cfg.vocab_size}"
        )
    if v.image_token_id in (cfg.boi_token_id, cfg.eoi_token_id):
        raise ValueError(
            f"the LLaVA's image_token_id {v.image_token_id} is also model.boi_token_id/eoi_token_id "
            f"({cfg.boi_token_id}/{cfg.eoi_token_id}): set model.boi_token_id / model.eoi_token_id to other ids"
        )


def is_text_tower_param(name: str) -> bool:
    """True for parameters copied from the base Llama or VLM (kept frozen, except in the Transfusion baseline)."""
    if name.startswith(_TEXT_TOWER_PREFIXES):
        return True
    parts = name.split(".")
    # layers.<i>.<proj>.text.weight  |  layers.<i>.<proj>.norm.text
    return parts[0] == "layers" and ("text" in parts[3:])
