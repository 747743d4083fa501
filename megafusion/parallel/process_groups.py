"""torch.distributed + megatron-core process groups, and the context handed to the model.

The model never looks up a global group: it receives a :class:`ParallelContext`
holding the tensor-parallel group and flags. This module is the only place that
initialises ``torch.distributed`` and megatron-core's ``parallel_state``.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megafusion.parallel.cpu_bridge import install_cpu_bridge


def default_backend() -> str:
    """NCCL with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise the default process group from torchrun/srun env vars, or as a one-rank group.

    With no RANK/WORLD_SIZE in the environment (a notebook, a unit test) a
    one-process group on a free localhost port is created, so the same
    megatron-core layers run unchanged at world size 1.
    """
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:  # one process: a private store, without leaking rendezvous variables to child processes
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_stages: int | None = None,
    backend: str | None = None,
) -> None:
    """Initialise torch.distributed (if needed) and megatron-core's TP/PP/DP groups."""
    init_distributed(backend)
    install_cpu_bridge()
    if ps.model_parallel_is_initialized():
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(
                f"model parallel groups already exist with TP={tp}, PP={pp}; asked for "
                f"TP={tensor_parallel}, PP={pipeline_parallel} (call destroy_model_parallel first)"
            )
        return
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
    )


def destroy_model_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


@dataclass
class ParallelContext:
    """What the model needs to know about the layout, passed explicitly."""

    tp_group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    sequence_parallel: bool = False

    @staticmethod
    def current(sequence_parallel: bool = False) -> ParallelContext:
        """Context for the megatron-core groups of this process (initialised beforehand)."""
        group = ps.get_tensor_model_parallel_group()
        size = dist.get_world_size(group)
        return ParallelContext(group, size, dist.get_rank(group), sequence_parallel and size > 1)
