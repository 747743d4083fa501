"""DeepSpeed ZeRO over the trainable parameters only, inside megatron-core's TP x PP x DP layout.

The optimizer is built on the trainable parameters (image tower, U-Nets,
<BOI>/<EOI> rows); the frozen text tower is not in any param group, so it gets
no gradient buffer, no fp32 master copy and no optimizer state. DeepSpeed
partitions that state over the data-parallel group that megatron-core
created, reached through :class:`MegatronMpu`.

Gradient accumulation belongs to megatron-core's schedule (several micro-batches
per step), so DeepSpeed runs with ``gradient_accumulation_steps: 1`` and the
trainer calls ``engine.allreduce_gradients()`` then ``engine.step()`` once per step.

Under bf16 the gradients accumulate and reduce in fp32 (megatron-core's main-grad idea, in
DeepSpeed's terms ``data_types.grad_accum_dtype=fp32`` + ``communication_data_type=fp32``): a
backward hook moves each micro-batch's bf16 gradient into an fp32 ``param.grad_accum``, the
data-parallel reduction runs on those, and the fp32 master copy is updated from them. At 128
micro-batches per step a bf16 sum would keep only the leading bits of the late micro-batches.
DeepSpeed would serve ZeRO-1 with that setting through its ``BF16_Optimizer``, whose state
layout our checkpoints do not read; :class:`_ZeroOneFp32AccumEngine` keeps ZeRO-1 on the ZeRO
optimizer, which implements the same fp32 accumulation (its ``grad_accum`` path).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megafusion.checkpoint.gather import REPLICA
from megafusion.config.schema import Config
from megafusion.parallel.grads import FP32_ACCUM


class MegatronMpu:
    """The ``mpu=`` object DeepSpeed expects, answered from megatron-core's parallel_state.

    megatron-core 0.16 no longer has ``get_model_parallel_rank``/``_world_size``;
    DeepSpeed still calls them. "Model parallel" = TP x PP (megatron's model-parallel group),
    so gradient norms are summed over every stage; DeepSpeed counts a replicated
    (non-TP) parameter on tensor-parallel rank 0 only.
    """

    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return torch.distributed.get_rank(ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return torch.distributed.get_world_size(ps.get_model_parallel_group())


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Norm weights, biases and embedding rows get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name or "embedding" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split by weight decay; tied replicas (weights broadcast, not optimized) excluded."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or REPLICA in name:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: Config, bf16: bool, num_trainable: int) -> dict[str, Any]:
    dp = ps.get_data_parallel_world_size()
    bucket = max(2, min(cfg.parallel.zero_bucket_elements, num_trainable))
    bucket += bucket % 2  # DeepSpeed asserts an even allgather bucket
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": 1,  # accumulation is megatron-core's schedule's
        "train_batch_size": cfg.data.micro_batch_size * dp,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "reduce_scatter": True,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        # fp32 gradient accumulation over the schedule's micro-batches and fp32 DP reduction (module docstring)
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if bf16 else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _zero_one_keeps_zero_optimizer() -> Iterator[None]:
    """Within: ``deepspeed.initialize`` builds a :class:`_ZeroOneFp32AccumEngine` (it looks the engine class
    up in its module at call time). Restored on exit, so no other engine in the process changes."""
    import deepspeed
    from deepspeed.runtime.constants import BFLOAT16
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    class _ZeroOneFp32AccumEngine(DeepSpeedEngine):
        """bf16 + fp32 grad accumulation + ZeRO-1 -> the ZeRO optimizer, not BF16_Optimizer (module docstring)."""

        def _do_optimizer_sanity_check(self, basic_optimizer):
            kind = super()._do_optimizer_sanity_check(basic_optimizer)
            return ZERO_OPTIMIZATION if kind == BFLOAT16 and self.zero_optimization() else kind

    saved = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = _ZeroOneFp32AccumEngine
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = saved


SHM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME


@contextlib.contextmanager
def _without_shm_inference_op() -> Iterator[None]:
    """Within: DeepSpeed's CPU comm backend skips JIT-building its shared-memory op.

    ``deepspeed.initialize`` creates its comm backend, whose constructor compiles
    ``deepspeed_shm_comm`` with gcc when the CPU accelerator offers it (35 s on a fresh
    2-core machine, the first training stage of ``make demo``). The op serves only
    ``inference_all_reduce`` (DeepSpeed-Inference tensor parallelism), which training never
    calls: every collective here goes through torch.distributed. Marking the op
    incompatible for the call makes ``build_shm_op`` return None, its documented
    fallback; the flag is restored on exit.
    """
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    saved = ops.get(SHM_OP)
    ops[SHM_OP] = False
    try:
        yield
    finally:
        if saved is None:
            ops.pop(SHM_OP, None)
        else:
            ops[SHM_OP] = saved


def build_engine(models, cfg: Config):
    """deepspeed.initialize on the trainable parameters of this rank's chunk(s); returns (engine, optimizer).

    ``engine.module`` is a ``ModuleList`` of the chunks; the chunks themselves are
    what megatron-core's schedule calls.
    """
    model = models if isinstance(models, torch.nn.Module) else torch.nn.ModuleList(models)
    if next(model.parameters()).device.type == "cpu":  # parallel.device=cpu, also on a CUDA machine
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    o = cfg.optim
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,  # one kernel per tensor on CUDA and CPU (torch >= 2.4)
    )
    optimized = [p for g in opt.param_groups for p in g["params"]]
    with _zero_one_keeps_zero_optimizer(), _without_shm_inference_op():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config=deepspeed_config(cfg, bf16, sum(p.numel() for p in optimized)),
            mpu=MegatronMpu(),
            dist_init_required=False,
        )
    if getattr(optimizer, "use_grad_accum_attribute", False):  # bf16: micro-batch grads go to p.grad_accum (fp32)
        for p in optimized:  # (DeepSpeed has put its fp32 partitions into opt.param_groups by now)
            setattr(p, FP32_ACCUM, True)
    return engine, optimizer


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state held by this rank (Adam moments + fp32 master partitions)."""
    total = 0
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                total += v.numel() * v.element_size()
    for part in getattr(optimizer, "single_partition_of_fp32_groups", []):
        total += part.numel() * part.element_size()
    return total
