"""Modality-routed column- and row-parallel projections on megatron-core layers.

Each routed projection holds two megatron-core shards of the same shape, the
text tower's and the image tower's (``ColumnParallelLinear`` /
``RowParallelLinear``: their weights carry the usual ``tensor_model_parallel``,
``partition_dim`` attributes, so megatron-core checkpointing and grad tools see
ordinary TP weights). Each token goes to its own modality's shard.

Why the communication is done here and not inside the megatron layers: a
routed projection needs exactly one collective over the *whole* sequence, like
an unrouted one. Under sequence parallelism the modality groups do not line up
with the sequence shards, so gather/reduce-scatter must run on the merged
sequence; the two tower shards are then applied as local matmuls on their
gathered rows. Without sequence parallelism the output all-reduce runs once on
the merged rows; the input copy (all-reduce of the input gradient in backward)
runs once per modality part, the same bytes as one all-reduce of the sequence.
``shared=True`` (the Transfusion baseline, ``model.architecture``) keeps only the
text shard and sends image rows through it too: the same code path and FLOPs.
The towers' ``_forward_impl`` is not used because DeepSpeed, not megatron's
``main_grad`` fusion, owns gradient accumulation here; plain ``F.linear``
lets autograd skip weight gradients of frozen (text) shards entirely.

Shapes: ``N`` is tokens of the micro-batch (s*b, sequence-major), ``N_local``
is N / TP under sequence parallelism, else N.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megafusion.model.norm import rms_norm
from megafusion.model.routing import Parts, Routes
from megafusion.parallel.process_groups import ParallelContext

TOWERS = ("text", "image")


def towers(shared: bool) -> tuple[str, ...]:
    """Towers a routed module holds: both, or only the text one when image tokens share it (Transfusion)."""
    return TOWERS[:1] if shared else TOWERS


def no_init(_: torch.Tensor) -> None:
    """Weights are loaded (HF import) or initialised by the model's own init pass."""


def _ensure_tp_attributes(weight: torch.Tensor, dim: int) -> None:
    # megatron-core sets these only when it initialises the weight itself.
    if not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


class RoutedNorm(nn.Module):
    """Pre-projection RMSNorm with one weight per tower (replicated over TP); one weight when ``shared``."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, sequence_parallel: bool, shared: bool = False):
        super().__init__()
        self.eps = eps
        for tower in towers(shared):
            p = nn.Parameter(torch.ones(size, dtype=dtype))
            # Under SP each rank normalises its own tokens only: grads are partial over TP.
            p.sequence_parallel = sequence_parallel
            setattr(self, tower, p)
        self.image_tower = "text" if shared else "image"  # the weight image tokens use

    def forward(self, parts: Parts) -> Parts:
        t, i = parts
        return (
            rms_norm(t, self.text, self.eps) if t is not None else None,
            rms_norm(i, getattr(self, self.image_tower), self.eps) if i is not None else None,
        )


class RoutedColumnParallelLinear(nn.Module):
    """y_m = norm_m(x_m) @ W_m^T for modality m, W_m split over TP along the output dim.

    Optionally fuses the tower's pre-norm (``pre_norm_eps``), the way
    megatron-core fuses LayerNorm into its column-parallel input linear.
    Input: residual stream [N_local, in]. Output: per-modality parts of the
    full sequence, [N_m, out / TP] each, ready for a routed row-parallel
    projection or for merging.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        pctx: ParallelContext,
        pre_norm_eps: float | None = None,
        shared: bool = False,
    ):
        super().__init__()
        self.pctx = pctx
        self.input_size, self.output_size = input_size, output_size
        self.norm = (
            RoutedNorm(input_size, pre_norm_eps, config.params_dtype, pctx.sequence_parallel, shared)
            if pre_norm_eps is not None
            else None
        )
        self.image_tower = "text" if shared else "image"  # the shard image tokens go through
        for tower in towers(shared):
            lin = ColumnParallelLinear(
                input_size,
                output_size,
                config=config,
                init_method=no_init,
                bias=False,
                gather_output=False,
                skip_bias_add=True,
                disable_grad_reduce=True,
                tp_group=pctx.tp_group,
            )
            _ensure_tp_attributes(lin.weight, 0)
            self.add_module(tower, lin)

    def tower(self, name: str) -> ColumnParallelLinear:
        return getattr(self, name)

    def forward(self, x: torch.Tensor, routes: Routes) -> Parts:
        group = self.pctx.tp_group
        if self.pctx.sequence_parallel:
            if self.norm is not None:  # normalise local tokens before the all-gather (cheaper)
                x = routes.local.merge(self.norm(routes.local.split(x)))
            x = gather_from_sequence_parallel_region(x, group=group)  # [N, in]; bwd reduce-scatter
            parts = routes.full.split(x)
        else:
            parts = routes.full.split(x)
            if self.norm is not None:
                parts = self.norm(parts)
            parts = tuple(  # identity fwd, all-reduce of the input grad bwd
                copy_to_tensor_model_parallel_region(p, group=group) if p is not None else None for p in parts
            )
        return self.forward_parts(parts)

    def forward_parts(self, parts: Parts) -> Parts:
        """Local matmuls only: parts already in the tensor-parallel region."""
        t, i = parts
        return (
            F.linear(t, self.text.weight) if t is not None else None,
            F.linear(i, self.tower(self.image_tower).weight) if i is not None else None,
        )


class RoutedRowParallelLinear(nn.Module):
    """y = merge(x_m @ W_m^T), W_m split over TP along the input dim, then one reduction.

    Input: per-modality parts (or a merged [N, in / TP] tensor). Output: the
    residual-stream layout [N_local, out], all-reduced (or reduce-scattered
    along the sequence under sequence parallelism).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        pctx: ParallelContext,
        shared: bool = False,
    ):
        super().__init__()
        self.pctx = pctx
        self.input_size, self.output_size = input_size, output_size
        self.image_tower = "text" if shared else "image"  # the shard image tokens go through
        for tower in towers(shared):
            lin = RowParallelLinear(
                input_size,
                output_size,
                config=config,
                init_method=no_init,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=True,
                tp_group=pctx.tp_group,
            )
            _ensure_tp_attributes(lin.weight, 1)
            self.add_module(tower, lin)

    def tower(self, name: str) -> RowParallelLinear:
        return getattr(self, name)

    def forward(self, x: torch.Tensor | Parts, routes: Routes) -> torch.Tensor:
        parts = routes.full.split(x) if isinstance(x, torch.Tensor) else x
        t, i = parts
        partial = routes.full.merge(
            (
                F.linear(t, self.text.weight) if t is not None else None,
                F.linear(i, self.tower(self.image_tower).weight) if i is not None else None,
            )
        )  # [N, out], partial sums over TP ranks
        group = self.pctx.tp_group
        if self.pctx.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=group)
        return reduce_from_tensor_model_parallel_region(partial, group=group)
