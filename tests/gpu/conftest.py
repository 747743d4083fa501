"""Fixtures and guards of the GPU tier (``tests/gpu``).

Every test here is marked ``gpu`` and skipped, with a reason, where ``torch.cuda.is_available()``
is false, so the CPU suite collects the tier (an import error still fails it) without running it.
All tests share one process and the one-rank NCCL group that the first of them creates
(``megafusion.api`` sets one up on first use, on ``cuda:0``); a test that needs a group of its
own runs in a subprocess.

The fp32 references must be IEEE fp32: TF32 matmuls and convolutions (cuDNN's default) carry
~1e-3 relative error, as large as what the tolerances here separate, so they are off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    torch.set_float32_matmul_precision("highest")  # the default, stated: fp32 matmuls (and FlexAttention) in IEEE fp32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN convolutions (the U-Nets) default to TF32


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test under tests/gpu without the ``gpu`` marker: it would run (and fail) in the CPU suite."""
    here = Path(__file__).parent.resolve()
    bare = [
        it.nodeid
        for it in items
        if here in Path(str(it.path)).resolve().parents and it.get_closest_marker("gpu") is None
    ]
    if bare:
        raise pytest.UsageError(f"tests under {here} must be marked gpu (module pytestmark): {bare}")


@pytest.fixture(scope="session")
def wide_hf(tmp_path_factory) -> Path:
    """A random-weight HF Llama wider than the CPU tier's (hidden 256, head_dim 64, GQA 4/2, llama3 RoPE):
    wide enough that bf16 rounding, not the tiny sizes, sets the error."""
    from tests.helpers import make_tiny_hf_llama

    return make_tiny_hf_llama(
        tmp_path_factory.mktemp("hf_wide") / "llama", hidden=256, heads=4, kv_heads=2, ffn=688, layers=2, seed=3
    )


@pytest.fixture(scope="session")
def hf_fp32(wide_hf):
    """transformers' LlamaForCausalLM on CUDA in fp32 (SDPA): the reference every bf16 result is held to."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(wide_hf, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
