"""Where a rank's tensors live and in which precision: ``parallel.device``, ``parallel.params_dtype``,
``parallel.backend``.

Each of the three is chosen explicitly or ``auto``-resolved from what the machine has, once, here,
and handed to the model through :class:`~megafusion.parallel.process_groups.ParallelContext`. No
other module asks ``torch.cuda.is_available()`` to decide a dtype, a device or a backend: that is
what let a CPU test never see the bf16 path, and what made two ranks on a one-GPU machine, or a
cluster that shows each task a single GPU, die with "invalid device ordinal".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megafusion.config.schema import BACKENDS, DEVICES

DTYPE_NAMES = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
"""parallel.params_dtype names (schema.PARAMS_DTYPES) -> dtypes; None = auto."""


class PlacementError(ValueError):
    """A device/dtype/backend setting this machine or this rank cannot honour; names the key and the values."""


@dataclass(frozen=True)
class Placement:
    """The resolved device, parameter dtype and process-group backend of one rank."""

    device: torch.device
    params_dtype: torch.dtype
    backend: str


def cuda_index(local_rank: int | None = None) -> int:
    """The CUDA device of this rank: 0 when the task sees one GPU (SLURM --gpus-per-task=1, one-GPU machines
    running several ranks), else LOCAL_RANK, which must name a visible device."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= count:
        raise PlacementError(
            f"LOCAL_RANK={local_rank} but this process sees {count} CUDA devices "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): launch at most {count} "
            "ranks per node, or show each task one GPU"
        )
    return local_rank


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' -> this rank's CUDA device when CUDA is available, else the CPU; 'cuda' without CUDA is an error."""
    if device not in DEVICES:
        raise PlacementError(f"parallel.device={device!r} must be one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PlacementError("parallel.device=cuda but torch sees no CUDA device on this machine")
    return torch.device("cuda", cuda_index(local_rank))


def resolve_params_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU (CPU bf16 is correct but slow: choose it to test that path)."""
    if name not in DTYPE_NAMES:
        raise PlacementError(f"parallel.params_dtype={name!r} must be auto, bf16 or fp32 (or bfloat16 / float32)")
    dtype = DTYPE_NAMES[name]
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> NCCL for CUDA tensors, gloo for CPU ones (gloo also reduces bf16, so the bf16 path runs on CPU)."""
    if name not in BACKENDS:
        raise PlacementError(f"parallel.backend={name!r} must be one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise PlacementError(f"parallel.backend=nccl needs CUDA tensors, but the device is {device}")
    return name


def resolve_placement(
    device: str = "auto", params_dtype: str = "auto", backend: str = "auto", local_rank: int | None = None
) -> Placement:
    """All three settings resolved for this rank (see the module docstring)."""
    dev = resolve_device(device, local_rank)
    return Placement(dev, resolve_params_dtype(params_dtype, dev), resolve_backend(backend, dev))
