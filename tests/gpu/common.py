"""What every GPU-tier module shares: the skip reason and the error measure its tolerances are stated in."""

from __future__ import annotations

import pytest
import torch

SKIP_REASON = "needs CUDA: run make test-gpu on a GPU machine"

GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=SKIP_REASON)]
"""The ``pytestmark`` of every module here: marked ``gpu``, skipped with the reason without CUDA."""


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64: one scale-free number per comparison."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
