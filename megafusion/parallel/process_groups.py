"""torch.distributed + megatron-core process groups, and the context handed to the model.

The model never looks up a global group: it receives a :class:`ParallelContext`
holding the tensor-parallel group and flags. This module is the only place that
initialises ``torch.distributed`` and megatron-core's ``parallel_state``.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megafusion.parallel.cpu_bridge import install_cpu_bridge
from megafusion.parallel.placement import Placement, PlacementError, resolve_params_dtype, resolve_placement
from megafusion.parallel.rank_env import export_rank_env

_placement: Placement | None = None
"""This process's device and backend, fixed by the first init_distributed (like megatron's parallel_state)."""


def process_placement() -> Placement:
    """The placement the process group was created with (``auto`` everything before one exists)."""
    return _placement if _placement is not None else resolve_placement()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the one of every group created later without one.

    ``dist.new_group(ranks)`` without ``timeout=`` gets torch's module default (30 min for gloo, 10 for
    NCCL), not the default group's: DeepSpeed's groups and the checkpoint saver's are made that way, and a
    rank blocked in one of them after a node is lost would wait that long whatever the setting says.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(
    backend: str | None = None,
    timeout_minutes: int = 30,
    *,
    device: str = "auto",
    params_dtype: str = "auto",
    timeout_s: float | None = None,
) -> Placement:
    """Initialise the default process group from torchrun/srun env vars, or as a one-rank group.

    With no RANK/WORLD_SIZE in the environment (a notebook, a unit test) a
    one-process group on a free localhost port is created, so the same
    megatron-core layers run unchanged at world size 1. ``backend`` / ``device`` /
    ``params_dtype`` are the ``parallel.*`` settings (``None`` = auto); a CUDA rank is
    bound to its device (``placement.cuda_index``) before the group exists, as NCCL wants.
    A second call returns the first placement, or refuses a different device or backend.
    ``timeout_s`` (``parallel.collective_timeout_s``; default ``timeout_minutes``) bounds how long a
    collective waits for a peer: a rank whose peer's node is lost fails after it instead of hanging.
    srun's SLURM_PROCID/NTASKS/LOCALID become RANK/WORLD_SIZE/LOCAL_RANK (``rank_env.export_rank_env``).
    """
    global _placement
    export_rank_env()
    want = resolve_placement(device, params_dtype, backend or "auto")
    if dist.is_initialized():  # by an earlier call, or by the caller itself (then the settings asked for hold)
        have = _placement = _placement or want
        if dist.get_backend() != want.backend or have.device.type != want.device.type:
            raise PlacementError(
                f"the process group already exists with backend {dist.get_backend()} on {have.device}; asked for "
                f"parallel.backend={want.backend}, parallel.device={want.device.type}"
            )
        return have
    timeout = (
        datetime.timedelta(seconds=timeout_s) if timeout_s is not None else datetime.timedelta(minutes=timeout_minutes)
    )
    _default_group_timeout(timeout)
    backend = want.backend
    if want.device.type == "cuda":
        torch.cuda.set_device(want.device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:  # one process: a private store, without leaking rendezvous variables to child processes
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    _placement = want
    return want


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_stages: int | None = None,
    backend: str | None = None,
    *,
    device: str = "auto",
    params_dtype: str = "auto",
    timeout_s: float | None = None,
) -> Placement:
    """Initialise torch.distributed (if needed) and megatron-core's TP/PP/DP groups; return the placement.

    ``timeout_s`` is the process-group timeout (``parallel.collective_timeout_s``); megatron-core's
    sub-groups are created with the same one, so a TP or PP peer lost mid-step also fails within it.
    """
    placement = init_distributed(backend, device=device, params_dtype=params_dtype, timeout_s=timeout_s)
    install_cpu_bridge(force=placement.device.type == "cpu")
    if ps.model_parallel_is_initialized():
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(
                f"model parallel groups already exist with TP={tp}, PP={pp}; asked for "
                f"TP={tensor_parallel}, PP={pipeline_parallel} (call destroy_model_parallel first)"
            )
        return placement
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise RuntimeError(
            f"world size {world} is not divisible by parallel.tensor_parallel={tensor_parallel} x "
            f"parallel.pipeline_parallel={pipeline_parallel}"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_stages,
        # gloo-side groups are only needed by CPU-offloaded optimizers; skip them under NCCL.
        create_gloo_process_groups=dist.get_backend() == "gloo",
        # the TP/PP/DP sub-groups' timeout (timedelta(minutes=...), so a fraction of a minute holds)
        distributed_timeout_minutes=(timeout_s / 60) if timeout_s is not None else 30,
    )
    return placement


def destroy_model_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _process_device() -> torch.device:
    return process_placement().device


def _process_dtype() -> torch.dtype:
    return process_placement().params_dtype


@dataclass
class ParallelContext:
    """What the model needs to know about the layout and placement, passed explicitly.

    ``device`` and ``params_dtype`` are where and in which precision the model's parameters are
    made (``parallel.device`` / ``parallel.params_dtype``); they default to the process's placement.
    """

    tp_group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=_process_device)
    params_dtype: torch.dtype = field(default_factory=_process_dtype)

    @staticmethod
    def current(sequence_parallel: bool = False, params_dtype: str | torch.dtype | None = None) -> ParallelContext:
        """Context for the megatron-core groups of this process (initialised beforehand).

        ``params_dtype`` (a ``parallel.params_dtype`` name or a dtype) overrides the process default, so one
        process can hold an fp32 and a bf16 model; the device is the process's.
        """
        group = ps.get_tensor_model_parallel_group()
        size = dist.get_world_size(group)
        place = process_placement()
        if params_dtype is None:
            dtype = place.params_dtype
        elif isinstance(params_dtype, torch.dtype):
            dtype = params_dtype
        else:
            dtype = resolve_params_dtype(params_dtype, place.device)
        return ParallelContext(group, size, dist.get_rank(group), sequence_parallel and size > 1, place.device, dtype)
