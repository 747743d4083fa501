"""Cutting LlamaFusion into pipeline stages (and virtual stages) for megatron-core's schedules.

Stage contents: the first chunk of pipeline rank 0 holds the text embedding, the
<BOI>/<EOI> rows and the U-Net down-sampler; the last chunk of the last rank
holds the final norm, LM head and U-Net up-sampler; layers are spread evenly,
interleaved the megatron-core way when virtual stages are configured.

The U-Net up-sampler needs the skip activations of the down-sampler, which
lives on another stage. Instead of widening every pipeline message, the last
stage keeps a *tied replica* of the down-sampler (as megatron-core keeps a
tied copy of the word embedding on the last stage) and recomputes the skips
from the same latents. After backward the replica's gradients are added to the
first stage's copy over megatron-core's embedding group; the replica is not in
the optimizer and receives the first stage's updated weights after each step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType

from megafusion.checkpoint.build import build_llamafusion
from megafusion.checkpoint.gather import REPLICA
from megafusion.checkpoint.hf_import import model_config_from_hf, read_hf_config
from megafusion.config.schema import Config
from megafusion.diffusion.objective import diffusion_mse, total_loss
from megafusion.model.image_io import build_image_io
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.grads import ensure_accumulated_grad, flat_collective
from megafusion.parallel.layout import layer_ids_for_chunk
from megafusion.parallel.process_groups import ParallelContext


class StageModule(nn.Module):
    """One pipeline chunk, shaped the way megatron-core's schedules call it.

    ``forward(batch, noise)`` returns the hidden states [s_local, b, h] on a
    non-last chunk and ``(loss, {"loss", "lm_loss", "diffusion_loss"})`` on the
    last one. The schedules need ``config``, ``model_type`` and ``set_input_tensor``.
    """

    def __init__(self, core: LlamaFusionModel, cfg: Config, with_replica: bool):
        super().__init__()
        self.core = core
        self.config = core.config
        self.model_type = ModelType.encoder_or_decoder
        self.loss_weight = cfg.diffusion.loss_weight
        self.pre_process, self.post_process = core.pre_process, core.post_process
        self.cfg = core.cfg
        if with_replica:  # same weights as the first stage's down-sampler (same seeded builder)
            replica, _ = build_image_io(core.cfg.image, core.cfg.hidden_size, core.cfg.rms_norm_eps, cfg.seed)
            dev = next(core.parameters()).device
            self.add_module(REPLICA, replica.to(device=dev, dtype=core.params_dtype))
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor) -> None:
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self.input_tensor = tensor

    def forward(self, batch, noise):
        core = self.core
        state = core.prepare(batch)
        skips = None
        if self.pre_process:
            x, skips = core.embed(batch, state)
        else:
            x = self.input_tensor
        x = core.run_layers(x, state)
        if not self.post_process:
            return x
        if skips is None and batch.num_images and hasattr(self, REPLICA):
            _, skips = getattr(self, REPLICA)(batch.latents.to(x.dtype), batch.timesteps)
        out = core.heads(x, batch, state, skips)
        lm = out.lm_loss
        diff = diffusion_mse(out.image_pred, noise, lm, batch.clean_images)
        loss = total_loss(lm, diff, self.loss_weight)
        # clones: megatron-core divides the returned loss in place by the number of micro-batches
        return loss, {
            "loss": loss.detach().clone(),
            "lm_loss": lm.detach().clone(),
            "diffusion_loss": diff.detach().clone(),
        }


def build_stage_models(cfg: Config, hf_dir: str, pctx: ParallelContext) -> list[StageModule]:
    """This rank's chunk(s), text tower loaded from ``hf_dir`` (its TP shard, its layers only)."""
    m = cfg.model
    mcfg = model_config_from_hf(
        read_hf_config(hf_dir),
        image=m.image,
        boi_token_id=m.boi_token_id,
        eoi_token_id=m.eoi_token_id,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        attention_backend=m.attention_backend,
        architecture=m.architecture,
    )
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(mcfg, key) != getattr(m, key):
            raise ValueError(
                f"checkpoint.hf_llama={hf_dir}: {key}={getattr(mcfg, key)} but the config says "
                f"model.{key}={getattr(m, key)}"
            )
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    vpp = cfg.parallel.virtual_pipeline_stages or 1
    chunks = []
    for chunk in range(vpp):
        first = pp_rank == 0 and chunk == 0
        last = pp_rank == pp - 1 and chunk == vpp - 1
        core = build_llamafusion(
            mcfg,
            pctx,
            hf_dir,
            seed=cfg.seed,
            pre_process=first,
            post_process=last,
            pipeline_parallel=pp,
            layer_ids=layer_ids_for_chunk(mcfg.num_layers, pp, vpp, pp_rank, chunk),
        )
        core.activation_checkpointing = cfg.parallel.activation_checkpointing
        # ZeRO-2 reduces in per-parameter backward hooks: every DP rank must fire all of them, in the same order
        core.every_param_in_graph = cfg.parallel.zero_stage == 2
        if vpp > 1:
            core.config.virtual_pipeline_model_parallel_size = vpp
        stage = StageModule(core, cfg, with_replica=last and not first and mcfg.image.io == "unet")
        stage.vp_stage = chunk if vpp > 1 else None
        chunks.append(stage)
    return chunks


def sync_replica_grads(models: list[StageModule]) -> None:
    """Add the last stage's down-sampler replica gradients into the first stage's copy (embedding group)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    params = _tied_params(models)
    if params is None:
        return
    grads = [ensure_accumulated_grad(p) for p in params]  # fp32 on the first stage under bf16, the replica's own
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    flat_collective(grads, lambda flat: dist.all_reduce(flat, group=ps.get_embedding_group()), write_back=first)
    if not first:  # the replica is not optimized: its weights come from the first stage after the step
        for p in params:
            p.grad = None


def broadcast_replica_weights(models: list[StageModule]) -> None:
    """After the optimizer step: first stage's down-sampler weights -> the last stage's replica."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    params = _tied_params(models)
    if params is None:
        return
    group = ps.get_embedding_group()
    src = dist.get_global_rank(group, 0)
    flat_collective(
        [p.detach() for p in params],
        lambda flat: dist.broadcast(flat, src=src, group=group),
        write_back=not ps.is_pipeline_first_stage(ignore_virtual=True),
    )


def _tied_params(models: list[StageModule]) -> list[nn.Parameter] | None:
    """The down-sampler parameters on the first stage, or the replica's on the last (same order)."""
    if ps.is_pipeline_first_stage(ignore_virtual=True):
        m = models[0]
        if not m.pre_process or m.cfg.image.io != "unet":
            return None
        return list(m.core.image_in.parameters())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        m = models[-1]
        replica = getattr(m, REPLICA, None)
        return list(replica.parameters()) if replica is not None else None
    return None
