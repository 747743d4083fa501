"""Gradient synchronisation that tensor parallelism itself requires (not data parallelism).

Under sequence parallelism each TP rank normalises only its own sequence
shard, so the replicated norm weights (marked ``sequence_parallel=True`` by
the routed norms) hold partial gradients that must be summed over the TP
group before the optimizer sees them, as megatron-core's
``finalize_model_grads`` does for its own layers.

Every other trainable parameter that each TP rank holds whole (the U-Nets, the <BOI>/<EOI>
rows, norms without sequence parallelism) sees the same tokens on every TP rank, so its
gradients agree only as far as the backward is bitwise deterministic; non-deterministic GPU
kernels (cuDNN convolution weight gradients) break that, and the replicas then drift apart
step by step. ``average_replicated_grads`` makes them equal by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def flat_collective(
    tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object], write_back: bool = True
) -> None:
    """Run ``collective`` once on the concatenation of ``tensors`` (one message, not one per
    tensor) and, if ``write_back``, copy the result into them."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    if write_back:
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def allreduce_sequence_parallel_grads(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    if dist.get_world_size(tp_group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]
    if not params:
        return
    for p in params:  # a rank whose shard held no token of a modality has no grad: treat as zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat_collective([p.grad for p in params], lambda flat: dist.all_reduce(flat, group=tp_group))


def tp_replicated(p: torch.nn.Parameter) -> bool:
    """Held whole by every TP rank and fed the full sequence there (not TP-sharded, not sequence-parallel)."""
    return not getattr(p, "tensor_model_parallel", False) and not getattr(p, "sequence_parallel", False)


def average_replicated_grads(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    """Mean over the TP group of the gradients of TP-replicated trainable parameters (one message)."""
    tp = dist.get_world_size(tp_group)
    if tp == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and tp_replicated(p)]
    for p in params:  # zeros where a rank's micro-batches never reached it, as every rank must send
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if params:

        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, group=tp_group)
            flat.div_(tp)

        flat_collective([p.grad for p in params], mean)
