"""Count the bytes of every live tensor storage created inside a block: current and peak.

CPU runs have no ``torch.cuda.max_memory_allocated``; process RSS mixes tensors with
the interpreter, libraries and allocator caches. This dispatch mode sees every op's
outputs, records each new storage once (by identity), and subtracts it when the
storage is freed, so ``peak`` is the high-water mark of tensor memory, what the
planner (``planning/memory.py``) estimates. Used by its tests; works the same on CUDA.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        nbytes = st.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
