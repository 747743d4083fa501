"""Train at TP=2, export with tools/export_hf.py, load back at TP=1 and into transformers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import mixed_batch, run_distributed

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_size=2",
    "optim.lr=3e-3",
    "optim.warmup_steps=1",
    "logging.tensorboard=false",
    "parallel.tensor_parallel=2",
    "parallel.sequence_parallel=true",
]


def _train_then_predict(rank, world, run_dir, hf_dir):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", BASE + [f"logging.run_dir={run_dir}"])
    init_model_parallel(2, 1)
    trainer = Trainer(cfg, hf_dir, log=lambda s: None)
    trainer.run(3)
    core = trainer.models[0].core
    batch = mixed_batch(cfg.model.vocab_size, image=cfg.model.image)
    with torch.no_grad():
        out = core(batch)
    return {"pred": out.image_pred, "lm_loss": out.lm_loss}


def test_export_roundtrip(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megafusion import LlamaFusion
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=4)
    r = run_distributed(_train_then_predict, 2, str(tmp_path / "run"), str(hf))[0]
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "tools/export_hf.py", "--in", str(tmp_path / "run" / "checkpoints"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the text tower is the base Llama, bit for bit, and transformers loads it
    a, b = load_file(str(out / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(str(hf)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert torch.equal(got, ref)
    # the trained image side comes back at TP=1 with the TP=2 run's outputs
    model = LlamaFusion.from_pretrained(str(out))
    cfg = model.cfg
    with torch.no_grad():
        back = model(mixed_batch(cfg.vocab_size, image=cfg.image))
    torch.testing.assert_close(back.image_pred, r["pred"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(back.lm_loss, r["lm_loss"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no megafusion_config.json"):
        LlamaFusion.from_pretrained(str(hf))
