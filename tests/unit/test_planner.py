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


LLAVA15_VISION = dict(  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336, feature layer -2, 2-layer GELU projector
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=24,
    num_heads=16,
    image_size=336,
    patch_size=14,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    text_hidden_size=4096,
    projector_act="gelu",
    projector_bias=True,
    feature_layers=(-2,),
    keep_cls=False,
    image_token_id=32000,
)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # LLaVA-1.5-7B: 23 of 24 layers run
        dict(feature_layers=(-1, 3, 0), keep_cls=True, projector_bias=False, text_hidden_size=8192),
        dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=28, patch_size=7),
    ],
    ids=["llava-1.5-7b", "multi-layer-no-bias", "tiny"],
)
def test_vision_params_count_the_built_vision_path(changes):
    import torch

    from megafusion.model.vision_tower import VisionPath, VisionSpec
    from megafusion.planning.memory import vision_params

    spec = VisionSpec(**{**LLAVA15_VISION, **changes})
    with torch.device("meta"):
        built = sum(p.numel() for p in VisionPath(spec).parameters())
    assert vision_params(spec) == built
    if not changes:
        assert spec.layers_needed == 23 and 300e6 < built < 320e6  # ViT-L minus a layer, plus a 21M projector


def test_vision_path_is_frozen_weights_of_the_first_stage_only():
    from megafusion.config import load_config
    from megafusion.model.vision_tower import VisionSpec
    from megafusion.parallel.layout import Layout, with_layout
    from megafusion.planning.memory import stage_memory, vision_params

    spec = VisionSpec(**LLAVA15_VISION)
    n = vision_params(spec)
    cfg = load_config("llama3-8b-fusion")
    for lay in (Layout(8, 4, 2, 1, True, True, 1, 1), Layout(2, 1, 4, 1, True, True, 1, 1), Layout(1, 3, 1)):
        c = with_layout(cfg, lay)
        for nbytes in (2, 4):
            plain, llava = stage_memory(c, lay, nbytes), stage_memory(c, lay, nbytes, vision=spec)
            assert [s.stage for s in plain] == [s.stage for s in llava]
            for a, b in zip(plain, llava):
                # whole on every TP rank (no /tp), in the parameter dtype, nothing else changes
                extra = n * nbytes if a.stage in ("first", "only") else 0
                assert b.frozen_weights - a.frozen_weights == extra, (str(lay), a.stage)
                assert b.peak - a.peak == extra
                for field in ("trainable_weights", "gradients", "optimizer", "bucket", "activations"):
                    assert getattr(a, field) == getattr(b, field), (str(lay), a.stage, field)


def _estimate(argv, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "tools" / "estimate_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_estimate_memory_reads_the_vision_tower_of_a_llava_dir(tmp_path, tiny_hf, capsys):
    from megafusion.checkpoint.hf_import import read_hf_config, vision_spec_from_hf
    from megafusion.planning.memory import vision_params
    from tests.helpers import make_tiny_hf_llava

    llava = make_tiny_hf_llava(tmp_path / "llava")
    n = vision_params(vision_spec_from_hf(read_hf_config(llava)))
    same_text = [  # the tiny LLaVA's language model (tests/helpers.py)
        "model.vocab_size=300",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.ffn_hidden_size=96",
        "model.boi_token_id=297",
        "model.eoi_token_id=298",
    ]
    opts = ["--dtype", "float32", "--gpus", "1"]
    base = ["--config", "tiny", *same_text, *opts]
    rc, plain = _estimate([*base, "--hf-dir", str(tiny_hf)], capsys)  # a plain Llama of the same text dims
    assert rc == 0 and "vision tower" not in plain, plain
    rc, out = _estimate([*base, "--hf-dir", str(llava)], capsys)
    assert rc == 0, out
    assert f"LLaVA vision tower + projector: {n / 1e6:.1f}M frozen parameters (2 of 3 CLIP layers run)" in out
    # the same from the config's checkpoint.hf_llama
    rc, from_cfg = _estimate(["--config", "tiny", *same_text, f"checkpoint.hf_llama={llava}", *opts], capsys)
    assert rc == 0 and "LLaVA vision tower + projector" in from_cfg, from_cfg
    # text dimensions that are not the config's are refused, as training refuses them
    rc, bad = _estimate(["--config", "tiny", "--gpus", "1", "--hf-dir", str(llava)], capsys)
    assert rc == 2 and "hidden_size=64 but the config says model.hidden_size=128" in bad, bad
    rc, missing = _estimate([*base, "--hf-dir", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "config.json not found" in missing, missing
