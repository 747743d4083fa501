"""tools/convert_hf_llama.py: an HF Llama converted at TP=2 x PP=2 trains exactly like one built from HF."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import run_distributed

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_size=2",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "optim.eps=1e-4",
    "logging.tensorboard=false",
    "checkpoint.interval=1000",
]


def _worker(rank, world, overrides, hf_dir, run_dir):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", BASE + overrides + [f"logging.run_dir={run_dir}", f"checkpoint.hf_llama={hf_dir}"])
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    trainer = Trainer(cfg, hf_dir, log=lambda s: None)
    loaded = trainer.maybe_resume()
    history = trainer.run(3)
    return {"loaded": torch.tensor(loaded), "losses": torch.tensor([h.loss for h in history], dtype=torch.float64)}


def test_converted_checkpoint_trains_like_hf(tmp_path):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=9)
    conv = tmp_path / "conv"
    r = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf_llama.py",
            "--hf-dir",
            str(hf),
            "--out",
            str(conv),
            "--tp",
            "2",
            "--pp",
            "2",
            "--config",
            "tiny",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (conv / "model").iterdir()) == [
        "tp0_pp0.safetensors",
        "tp0_pp1.safetensors",
        "tp1_pp0.safetensors",
        "tp1_pp1.safetensors",
    ]
    ref = run_distributed(_worker, 1, [], str(hf), str(tmp_path / "ref"))[0]
    got = run_distributed(
        _worker,
        4,
        ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", f"checkpoint.load={conv}"],
        str(hf),
        str(tmp_path / "conv_run"),
    )
    assert not ref["loaded"].item() and all(g["loaded"].item() for g in got)
    torch.testing.assert_close(got[-1]["losses"], ref["losses"], atol=1e-5, rtol=1e-5)
    # a converted checkpoint at another layout is refused with a message naming both layouts
    bad = run_distributed_expect_error(hf, conv, tmp_path)
    assert "saved with layout" in bad and "convert or reshard" in bad


def _bad_layout_worker(rank, world, hf_dir, conv, run_dir):
    from megafusion.checkpoint.files import CheckpointError

    try:
        _worker(rank, world, [f"checkpoint.load={conv}"], hf_dir, run_dir)
    except CheckpointError as exc:
        return {"msg": str(exc)}
    return {"msg": ""}


def run_distributed_expect_error(hf, conv, tmp_path) -> str:
    return run_distributed(_bad_layout_worker, 1, str(hf), str(conv), str(tmp_path / "bad"))[0]["msg"]
