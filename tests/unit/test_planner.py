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

    cfg = load_config(
        "tiny", overrides + [f"logging.run_dir={run_dir}", "logging.tensorboard=false", "checkpoint.interval=1000"]
    )
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    tracker = TensorMemoryTracker()
    with tracker:
        trainer = Trainer(cfg, hf_dir, log=lambda s: None)
        trainer.run(2)
    return {"peak": torch.tensor(tracker.peak, dtype=torch.float64)}


@pytest.mark.parametrize(
    "overrides,world",
    [
        ([], 1),
        (["model.num_layers=8"], 1),
        (["data.seq_length=256"], 1),
        (["parallel.pipeline_parallel=2", "data.micro_batch_size=1"], 2),
        (["parallel.params_dtype=bf16"], 1),  # bf16 weights, fp32 gradient accumulation
    ],
    ids=["tiny", "tiny-8-layers", "tiny-seq256", "tiny-pp2", "tiny-bf16"],
)
def test_planner_matches_measured_peak(tmp_path, overrides, world):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.parallel.layout import layout_of
    from megafusion.planning.memory import stage_memory

    cfg = load_config("tiny", overrides)
    hf = write_random_hf_llama(cfg.model, tmp_path / "hf")
    measured = [r["peak"].item() for r in run_distributed(_measure, world, overrides, str(hf), str(tmp_path / "run"))]
    dtype_bytes = 2 if cfg.parallel.params_dtype == "bf16" else 4  # CPU runs are fp32 unless asked
    stages = stage_memory(cfg, layout_of(cfg, world), dtype_bytes=dtype_bytes)
    assert len(stages) == world
    for got, st in zip(measured, stages):  # rank r holds pipeline stage r
        assert abs(st.peak - got) <= 0.15 * got, (st.stage, st.peak / 2**20, got / 2**20)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "tools/estimate_memory.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_slurm_layouts_fit_80gb():
    for preset, gpus in (("llama3-8b-fusion", "64"), ("llama3-70b-fusion", "256")):
        r = _cli("--config", preset, "--gpus", gpus, "--layouts")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fits 80 GiB" in r.stdout and "layouts on" in r.stdout and "TP8 PP" in r.stdout
    r = _cli(
        "--config",
        "llama3-70b-fusion",
        "parallel.pipeline_parallel=1",
        "parallel.activation_checkpointing=false",
        "--gpus",
        "8",
        "--gpu-gb",
        "80",
    )
    assert r.returncode == 1 and "does NOT fit" in r.stdout


@pytest.mark.parametrize(
    "preset,gpu_counts",
    [
        ("tiny", (1, 2, 4, 8)),
        ("llama3-8b-fusion", (8, 16, 64)),
        ("llama3-70b-fusion", (64, 128, 256)),
    ],
)
def test_planner_proposes_only_layouts_the_config_rules_accept(preset, gpu_counts):
    from megafusion.config import config_problems, load_config
    from megafusion.parallel.layout import with_layout
    from megafusion.planning.memory import candidate_layouts

    cfg = load_config(preset)
    for gpus in gpu_counts:
        proposed = candidate_layouts(cfg, gpus)
        assert proposed, (preset, gpus)
        for lay in proposed:
            assert config_problems(with_layout(cfg, lay), world_size=gpus) == [], (preset, gpus, str(lay))
    # the shipped SLURM layouts are among the proposals, with the ZeRO stage the rules allow
    if preset == "llama3-70b-fusion":
        assert "TP8 PP4 DP8 SP ZeRO-1 mb1" in {str(lay) for lay in candidate_layouts(cfg, 256)}
    if preset == "tiny":  # ZeRO-2 with sequence parallelism at TP > 1 is refused by the rules: not proposed
        assert not [lay for lay in candidate_layouts(cfg, 4) if lay.zero_stage == 2 and lay.sequence_parallel]


def test_converter_refuses_a_layout_by_the_config_split_rules(tiny_hf, tmp_path):
    from megafusion.checkpoint.convert import convert_hf_llama
    from megafusion.config import ConfigError, load_config, validate_config
    from megafusion.config.validate import split_problems

    cfg = load_config("tiny")
    m = cfg.model  # 4 heads, 2 kv heads, ffn 352, 4 layers
    assert [p.short() for p in split_problems(m, 3, 1)] == [
        "attention heads 4 not divisible by 3",
        "kv heads 2 not divisible by 3",
        "ffn size 352 not divisible by 3",
    ]
    assert [str(p) for p in split_problems(m, 1, 3)] == [
        "model.num_layers=4 is not divisible by parallel.pipeline_parallel=3"
    ]
    with pytest.raises(ConfigError, match="model.num_layers=4 is not divisible by parallel.pipeline_parallel=3"):
        validate_config(load_config("tiny", ["parallel.pipeline_parallel=3"]))
    # the tiny HF Llama has 2 layers and 4 / 2 heads: the converter asks the same rules
    with pytest.raises(ValueError, match="cannot be split as TP=1 PP=3: layers 2 not divisible by 3"):
        convert_hf_llama(tiny_hf, tmp_path / "out", cfg, tp=1, pp=3, progress=False)
    with pytest.raises(ValueError, match="kv heads 2 not divisible by 4"):
        convert_hf_llama(tiny_hf, tmp_path / "out", cfg, tp=4, pp=1, progress=False)
    assert not (tmp_path / "out").exists()
