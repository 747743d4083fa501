"""A one-process NCCL group made by ``init_model_parallel``, in a fresh subprocess.

The process group is process-global and the tier's pytest process already holds one (made by whichever
test ran first), so the explicit ``backend="nccl", device="cuda"`` call runs where no group exists yet:
a child interpreter, with no torchrun/SLURM variables, so it takes the one-process path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tests.gpu.common import GPU_ONLY

pytestmark = GPU_ONLY

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist

    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel

    placement = init_model_parallel(1, 1, backend="nccl", device="cuda")
    assert placement.backend == "nccl", placement
    assert placement.device == torch.device("cuda", 0), placement
    assert placement.params_dtype == torch.bfloat16, placement  # auto on CUDA
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    assert torch.cuda.current_device() == 0

    x = (torch.arange(4096, device="cuda") % 251).to(torch.bfloat16)  # integers: exact in bf16
    want = x.clone()
    dist.all_reduce(x)  # the world group
    pctx = ParallelContext.current()
    dist.all_reduce(x, group=pctx.tp_group)  # megatron-core's TP group, as the model's collectives use it
    torch.cuda.synchronize()
    assert x.dtype == torch.bfloat16 and x.device == torch.device("cuda", 0)
    assert torch.equal(x, want), "a one-rank all-reduce must return its input"

    assert pctx.device == torch.device("cuda", 0), pctx.device
    assert pctx.params_dtype == torch.bfloat16 and pctx.tp_size == 1 and pctx.tp_rank == 0
    # a second call with the same settings returns the same placement; a different backend is refused
    assert init_model_parallel(1, 1, backend="nccl", device="cuda") == placement
    try:
        init_model_parallel(1, 1, backend="gloo", device="cpu")
    except ValueError as exc:
        assert "already exists" in str(exc), exc
    else:
        raise AssertionError("a gloo/cpu request over the NCCL group was accepted")
    dist.destroy_process_group()
    print("NCCL-OK")
    """
)


def test_init_model_parallel_nccl_one_process():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "NCCL-OK" in res.stdout, f"rc {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    assert torch.cuda.is_available()
