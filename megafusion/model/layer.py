"""One LlamaFusion transformer layer: routed norms/projections around a shared attention.

Reads like a single-device Llama layer; every collective lives inside the
routed projections (``megafusion.model.routed_linear``).

Per-rank fused weight layouts (what ``checkpoint.tp_layout`` slices HF weights into):
    qkv     : [q heads of this rank; k heads of this rank; v heads of this rank]  rows
    gate_up : [gate rows of this rank; up rows of this rank]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig

from megafusion.config.schema import ModelConfig
from megafusion.model.attention_core import AttentionMask, shared_attention
from megafusion.model.rope import apply_rope
from megafusion.model.routed_linear import RoutedColumnParallelLinear, RoutedRowParallelLinear
from megafusion.model.routing import Routes
from megafusion.parallel.process_groups import ParallelContext

if TYPE_CHECKING:  # no import at run time
    from megafusion.model.kv_cache import KVCache


@dataclass
class LayerInputs:
    """Per-forward state shared by all layers (built once by the model)."""

    routes: Routes
    mask: AttentionMask
    cos: torch.Tensor  # [b, s, head_dim]
    sin: torch.Tensor
    seq_len: int
    batch_size: int
    kv_cache: KVCache | None = None  # inference: keys/values of earlier tokens (megafusion.inference)


class FusionLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, config: ModelParallelConfig, pctx: ParallelContext, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # global index: the key of this layer's entry in an inference KV cache
        d = cfg.head_dim
        self.head_dim = d
        self.heads = cfg.num_attention_heads // pctx.tp_size  # local query heads
        self.kv_heads = cfg.num_kv_heads // pctx.tp_size  # local kv heads
        self.ffn_local = cfg.ffn_hidden_size // pctx.tp_size
        shared = cfg.architecture == "transfusion"  # one tower for both modalities (the baseline)
        self.qkv = RoutedColumnParallelLinear(
            cfg.hidden_size,
            (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * d,
            config=config,
            pctx=pctx,
            pre_norm_eps=cfg.rms_norm_eps,
            shared=shared,
        )
        self.o = RoutedRowParallelLinear(
            cfg.num_attention_heads * d, cfg.hidden_size, config=config, pctx=pctx, shared=shared
        )
        self.gate_up = RoutedColumnParallelLinear(
            cfg.hidden_size,
            2 * cfg.ffn_hidden_size,
            config=config,
            pctx=pctx,
            pre_norm_eps=cfg.rms_norm_eps,
            shared=shared,
        )
        self.down = RoutedRowParallelLinear(
            cfg.ffn_hidden_size, cfg.hidden_size, config=config, pctx=pctx, shared=shared
        )

    def forward(self, x: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """x [s_local, b, h] -> [s_local, b, h]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N_local, h]
        x = x + self._attention(x, inp)
        x = x + self._ffn(x, inp)
        return x.view(shape)

    def _attention(self, x: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        s, b, d = inp.seq_len, inp.batch_size, self.head_dim
        qkv = inp.routes.full.merge(self.qkv(x, inp.routes))  # [s*b, (hq + 2 hkv) d]
        qkv = qkv.view(s, b, self.heads + 2 * self.kv_heads, d)  # [s, b, hq+2hkv, d]
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q = apply_rope(q.permute(1, 2, 0, 3), inp.cos, inp.sin)  # [b, hq, s, d]
        k = apply_rope(k.permute(1, 2, 0, 3), inp.cos, inp.sin)  # [b, hkv, s, d]
        v = v.permute(1, 2, 0, 3)
        if inp.kv_cache is not None:  # keys/values of the cached prefix first: [b, hkv, s_past + s, d]
            k, v = inp.kv_cache.extend(self.layer_id, k, v)
        out = shared_attention(q, k, v, inp.mask)  # [b, hq, s, d]
        out = out.permute(2, 0, 1, 3).reshape(s * b, self.heads * d)  # [s*b, hq d]
        return self.o(out, inp.routes)

    def _ffn(self, x: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        gu = self.gate_up(x, inp.routes)  # per modality [N_m, 2 ffn_local]
        act = tuple(_swiglu(p) if p is not None else None for p in gu)
        return self.down(act, inp.routes)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
