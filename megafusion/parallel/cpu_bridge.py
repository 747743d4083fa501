"""Let megatron-core's CUDA-assuming code paths run on CPU with gloo.

megatron-core allocates some buffers with ``device=torch.cuda.current_device()``
or ``device="cuda"`` (the all-gathers in ``tensor_parallel.mappings``, the token
counters of ``pipeline_parallel.schedules``, the shape exchange of
``p2p_communication``) and calls ``torch.cuda.synchronize()``. On a machine
without CUDA this module gives exactly those megatron-core modules a ``torch``
whose ``cuda.current_device()`` answers ``"cpu"``, whose tensor factories map
``device="cuda"`` to the CPU and whose ``cuda.synchronize()`` is a no-op;
everything else is the real ``torch``. Nothing changes for any other module, and nothing at all
changes when CUDA is available (unless the run asks for ``parallel.device=cpu``): the GPU path is
megatron-core's own code.

The list of patched modules was written against megatron-core 0.16; a different
version is refused with a clear error rather than silently mis-bridged.
"""

from __future__ import annotations

import importlib
import types

import torch

SUPPORTED_MEGATRON = ("0.16.",)
BRIDGED_MODULES = (
    "megatron.core.tensor_parallel.mappings",  # all-gather / reduce-scatter buffers
    "megatron.core.pipeline_parallel.schedules",  # torch.zeros(..., device="cuda") token counters
    "megatron.core.pipeline_parallel.p2p_communication",  # shape buffers, torch.cuda.synchronize()
)
_installed = False


class _CpuCuda(types.ModuleType):
    """torch.cuda as seen by bridged modules on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch.cuda(cpu-bridge)")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None


def _on_cpu(factory):
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _TorchForCpu(types.ModuleType):
    """torch, except that tensor factories asked for device="cuda" allocate on the CPU."""

    def __init__(self):
        super().__init__("torch(cpu-bridge)")
        self.cuda = _CpuCuda()
        for name in ("zeros", "ones", "empty", "full", "tensor"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def install_cpu_bridge(force: bool = False) -> bool:
    """Install the bridge if CUDA is absent, or if ``force`` (``parallel.device=cpu`` on a CUDA machine);
    return whether it is active. Idempotent."""
    global _installed
    if torch.cuda.is_available() and not force and not _installed:
        return False
    if _installed:
        return True
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(SUPPORTED_MEGATRON):
        raise RuntimeError(
            f"megafusion's CPU bridge was written for megatron-core {SUPPORTED_MEGATRON}, found {version}; "
            "re-check the CUDA-only spots listed in megafusion/parallel/cpu_bridge.py before running on CPU"
        )
    proxy = _TorchForCpu()
    for name in BRIDGED_MODULES:
        mod = importlib.import_module(name)
        mod.torch = proxy
    _installed = True
    return True
