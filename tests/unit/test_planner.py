"""tools/estimate_memory.py: its figures against the peak tensor memory of real CPU training runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _measure(rank, world, overrides, hf_dir, run_dir):
    import torch

    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.planning.tensor_memory import TensorMemoryTracker
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", overrides + [f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                                           "checkpoint.interval=1000"])
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    tracker = TensorMemoryTracker()
    with tracker:
        trainer = Trainer(cfg, hf_dir, log=lambda s: None)
        trainer.run(2)
    return {"peak": torch.tensor(tracker.peak, dtype=torch.float64)}


@pytest.mark.parametrize("overrides,world", [
    ([], 1),
    (["model.num_layers=8"], 1),
    (["data.seq_length=256"], 1),
    (["parallel.pipeline_parallel=2", "data.micro_batch_size=1"], 2),
], ids=["tiny", "tiny-8-layers", "tiny-seq256", "tiny-pp2"])
def test_planner_matches_measured_peak(tmp_path, overrides, world):
    from megafusion.checkpoint.tiny_llama import write_random_hf_llama
    from megafusion.config import load_config
    from megafusion.planning.memory import layout_of, stage_memory

    cfg = load_config("tiny", overrides)
    hf = write_random_hf_llama(cfg.model, tmp_path / "hf")
    measured = [r["peak"].item() for r in run_distributed(_measure, world, overrides, str(hf), str(tmp_path / "run"))]
    stages = stage_memory(cfg, layout_of(cfg, world), dtype_bytes=4)  # CPU runs are fp32
    assert len(stages) == world
    for got, st in zip(measured, stages):  # rank r holds pipeline stage r
        assert abs(st.peak - got) <= 0.15 * got, (st.stage, st.peak / 2**20, got / 2**20)


def _cli(*args):
    return subprocess.run([sys.executable, "tools/estimate_memory.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_slurm_layouts_fit_80gb():
    for preset, gpus in (("llama3-8b-fusion", "64"), ("llama3-70b-fusion", "256")):
        r = _cli("--config", preset, "--gpus", gpus, "--layouts")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fits 80 GiB" in r.stdout and "layouts on" in r.stdout and "TP8 PP" in r.stdout
    r = _cli("--config", "llama3-70b-fusion", "parallel.pipeline_parallel=1", "parallel.activation_checkpointing=false",
             "--gpus", "8", "--gpu-gb", "80")
    assert r.returncode == 1 and "does NOT fit" in r.stdout
