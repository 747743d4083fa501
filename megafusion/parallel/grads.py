"""Gradient synchronisation that tensor parallelism itself requires (not data parallelism).

Under sequence parallelism each TP rank normalises only its own sequence
shard, so the replicated norm weights (marked ``sequence_parallel=True`` by
the routed norms) hold partial gradients that must be summed over the TP
group before the optimizer sees them, as megatron-core's
``finalize_model_grads`` does for its own layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def allreduce_sequence_parallel_grads(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    if dist.get_world_size(tp_group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]
    if not params:
        return
    for p in params:  # a rank whose shard held no token of a modality has no grad: treat as zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
