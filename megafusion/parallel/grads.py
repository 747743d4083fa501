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

Under bf16 the micro-batch gradients of a trainable parameter are not summed in its bf16
``.grad``: DeepSpeed's backward hook moves each one into an fp32 ``grad_accum`` attribute
(``training/engine.py`` sets ``grad_accum_dtype=fp32``), the way megatron-core keeps a
``main_grad``. Everything here reads and writes that buffer through :func:`accumulated_grad`,
and every collective runs on an fp32 copy, so no sum of gradients is ever rounded to bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

FP32_ACCUM = "fp32_grad_accum"
"""Attribute the engine sets on each parameter whose micro-batch gradients DeepSpeed folds into an fp32
``p.grad_accum`` (bf16 runs). DeepSpeed itself gives every optimized parameter a ``grad_accum`` attribute,
used or not, so its presence says nothing."""


def accumulated_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient of ``p`` summed over this step's micro-batches: the fp32 ``grad_accum`` DeepSpeed keeps
    under bf16 for optimized parameters, else ``p.grad`` (fp32 runs, parameters outside the optimizer)."""
    if getattr(p, FP32_ACCUM, False):
        return p.grad_accum
    return p.grad


def ensure_accumulated_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """:func:`accumulated_grad`, created as zeros where this step gave ``p`` no gradient (in its own dtype:
    fp32 for a ``grad_accum``), so every rank sends the same collectives whatever its micro-batches held."""
    if getattr(p, FP32_ACCUM, False):
        if p.grad is not None:  # a gradient the hook has not folded in yet (a backward outside DeepSpeed's view)
            grad, p.grad = p.grad, None
            p.grad_accum = grad.float() if p.grad_accum is None else p.grad_accum.add_(grad.float())
        if p.grad_accum is None:
            p.grad_accum = torch.zeros_like(p, dtype=torch.float32)
        return p.grad_accum
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def flat_collective(
    tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object], write_back: bool = True
) -> None:
    """Run ``collective`` once on the concatenation of ``tensors`` (one message, not one per
    tensor) and, if ``write_back``, copy the result into them. The message is fp32 whatever the
    tensors' dtypes: a sum of bf16 gradients is rounded to bf16 at most once, on write-back."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
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
    # a rank whose shard held no token of a modality has no grad: zeros
    grads = [ensure_accumulated_grad(p) for p in params]
    flat_collective(grads, lambda flat: dist.all_reduce(flat, group=tp_group))


def tp_replicated(p: torch.nn.Parameter) -> bool:
    """Held whole by every TP rank and fed the full sequence there (not TP-sharded, not sequence-parallel)."""
    return not getattr(p, "tensor_model_parallel", False) and not getattr(p, "sequence_parallel", False)


def average_replicated_grads(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    """Mean over the TP group of the gradients of TP-replicated trainable parameters (one message)."""
    tp = dist.get_world_size(tp_group)
    if tp == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and tp_replicated(p)]
    # zeros where a rank's micro-batches never reached it, as every rank must send
    grads = [ensure_accumulated_grad(p) for p in params]
    if params:

        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, group=tp_group)
            flat.div_(tp)

        flat_collective(grads, mean)


def broadcast_replicated_weights(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    """TP rank 0's values of the TP-replicated trainable parameters -> every TP rank (one message).

    For ZeRO-2, where gradients are reduced and freed inside backward hooks, before
    :func:`average_replicated_grads` could see them: the replicas are made equal after the
    step instead. Each rank's optimizer still steps its own copy; the weights the model uses
    are always rank 0's trajectory.
    """
    if dist.get_world_size(tp_group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and tp_replicated(p)]
    if params:
        src = dist.get_global_rank(tp_group, 0)
        flat_collective([p.detach() for p in params], lambda flat: dist.broadcast(flat, src=src, group=tp_group))
