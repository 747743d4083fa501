"""Reassemble TP-sharded parameters (or their gradients) into full, layout-independent tensors.

Used by tests (a TP=2 run compared to a TP=1 run) and by exporters. The shard
kind of every parameter is decided from its name in one place, ``shard_kind``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from megafusion.checkpoint.tp_layout import (
    gate_up_shard,
    gate_up_unshard,
    qkv_shard,
    qkv_unshard,
    row_shard,
    vocab_shard,
    vocab_unshard,
)
from megafusion.parallel.grads import accumulated_grad

REPLICA = "skip_encoder_replica"
"""Module name of the last pipeline stage's tied copy of the U-Net down-sampler (``training.stages``):
checkpoint keys ``{chunk}.skip_encoder_replica.*``, beside ``{chunk}.core.*`` for the model itself."""


def shard_kind(name: str) -> str:
    """'qkv' | 'gate_up' | 'row' | 'vocab' | 'replicated' for a LlamaFusion parameter name."""
    if name in ("embedding.weight", "lm_head.weight"):
        return "vocab"
    parts = name.split(".")
    if parts[0] == "layers" and parts[-1] == "weight" and parts[-2] in ("text", "image"):
        return {"qkv": "qkv", "gate_up": "gate_up", "o": "row", "down": "row"}[parts[2]]
    return "replicated"


def canonical_name(name: str) -> str | None:
    """Checkpoint key -> layout-independent name: '1.core.layers.3.qkv.image.weight' -> 'layers.3.qkv.image.weight'.

    None for the last stage's tied U-Net replica (``1.{REPLICA}.*``), a copy of image_in.
    """
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "core":
        return ".".join(parts[2:])
    return None


def gather_full(model, which: Literal["param", "grad"] = "param") -> dict[str, torch.Tensor]:
    """Every parameter (or grad; zeros where None) as its full tensor, on every TP rank."""
    pctx, cfg = model.pctx, model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if which == "param":
            t = p.detach()
        else:  # the step's summed gradient (fp32 under bf16 training), zeros where none
            g = accumulated_grad(p)
            t = g if g is not None else torch.zeros_like(p)
        kind = shard_kind(name)
        if kind == "replicated" or pctx.tp_size == 1 and kind != "vocab":
            out[name] = t.clone()
            continue
        shards = [torch.empty_like(t) for _ in range(pctx.tp_size)]
        if pctx.tp_size > 1:
            dist.all_gather(shards, t.contiguous(), group=pctx.tp_group)
        else:
            shards = [t]
        out[name] = unshard(name, shards, cfg)
    return out


def unshard(name: str, shards: list[torch.Tensor], cfg) -> torch.Tensor:
    """The full tensor of parameter ``name`` from its TP shards in rank order (one shard if replicated)."""
    kind = shard_kind(name)
    if kind == "qkv":
        d = cfg.head_dim
        return torch.cat(qkv_unshard(shards, cfg.num_attention_heads * d, cfg.num_kv_heads * d), 0)
    if kind == "gate_up":
        return torch.cat(gate_up_unshard(shards), 0)
    if kind == "row":
        return torch.cat(shards, 1)
    if kind == "vocab":
        return vocab_unshard(shards, cfg.vocab_size)
    return shards[0]


def shard(name: str, full: torch.Tensor, cfg, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of parameter ``name`` at TP size ``tp``: the inverse of :func:`unshard`."""
    kind = shard_kind(name)
    if kind == "qkv":
        d = cfg.head_dim
        q, k, v = full.split([cfg.num_attention_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d], 0)
        return qkv_shard(q, k, v, tp, rank)
    if kind == "gate_up":
        return gate_up_shard(*full.chunk(2, 0), tp, rank)
    if kind == "row":
        return row_shard(full, tp, rank)
    if kind == "vocab":  # trained only by the Transfusion baseline: pad to this TP size, take the rank's rows
        from megafusion.parallel.megatron_config import padded_vocab_size

        return vocab_shard(full, padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp), tp, rank)
    return full
