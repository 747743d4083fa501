"""tools/reshard_checkpoint.py: a trained checkpoint re-cut for other TP/PP/DP layouts resumes on the same trajectory.

The reference never reshards: one uninterrupted TP=2 x PP=2 run. Every resharded
resume must reproduce its losses after the cut (the same global batches: item
seeds count micro-batches over the global batch, so the DP size does not change them).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
CUT, TOTAL = 2, 4


def _train(rank, world, overrides, hf_dir, run_dir, steps):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", BASE + overrides + [f"logging.run_dir={run_dir}", f"checkpoint.hf_llama={hf_dir}"])
    p = cfg.parallel
    init_model_parallel(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_stages)
    trainer = Trainer(cfg, hf_dir, log=lambda s: None)
    resumed = trainer.maybe_resume()
    start = trainer.step
    history = trainer.run(steps)
    return {
        "resumed": torch.tensor(resumed),
        "start": torch.tensor(start),
        "losses": torch.tensor([h.loss for h in history], dtype=torch.float64),
        "grad_norms": torch.tensor([h.grad_norm for h in history], dtype=torch.float64),
    }


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(hf dir, TP=2 x PP=2 checkpoint after CUT steps, reference losses of steps CUT+1..TOTAL)."""
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    tmp = tmp_path_factory.mktemp("reshard")
    hf = write_random_hf_llama(load_config("tiny").model, tmp / "base", seed=5)
    layout = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]
    ref = run_distributed(_train, 4, layout, str(hf), str(tmp / "ref"), TOTAL)[-1]
    cut = run_distributed(_train, 4, layout, str(hf), str(tmp / "cut"), CUT)[-1]
    torch.testing.assert_close(cut["losses"], ref["losses"][:CUT], atol=0, rtol=0)  # same runs up to the cut
    return hf, tmp / "cut" / "checkpoints" / f"step_{CUT:08d}", ref, tmp


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,pp,vpp,world,via",
    [(1, 1, 1, 1, None), (2, 1, 1, 2, (1, 2)), (1, 2, 1, 2, None), (1, 2, 2, 2, None), (1, 1, 1, 2, None)],
    ids=["tp1pp1", "tp2pp1-via-tp1pp2", "tp1pp2", "tp1pp2vpp2", "tp1dp2"],
)
def test_resharded_resume_continues_the_trajectory(trained, tp, pp, vpp, world, via):
    hf, ckpt, ref, tmp = trained
    dp = world // (tp * pp)
    out = tmp / f"out_{tp}_{pp}_{vpp}_{world}"
    if via:  # reshard a resharded checkpoint (per-parameter optimizer state as input)
        mid = tmp / f"mid_{via[0]}_{via[1]}"
        r = _tool(
            "tools/reshard_checkpoint.py",
            "--in",
            str(ckpt),
            "--out",
            str(mid),
            "--tp",
            str(via[0]),
            "--pp",
            str(via[1]),
            "--no-progress",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        ckpt = mid
    r = _tool(
        "tools/reshard_checkpoint.py",
        "--in",
        str(ckpt),
        "--out",
        str(out),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--vpp",
        str(vpp),
        "--dp",
        str(dp),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[reshard]" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layout"] == {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp} and meta["step"] == CUT
    assert meta["resharded_from"]["tp"] == (via[0] if via else 2)
    overrides = [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}", f"checkpoint.load={out}"]
    if vpp > 1:
        overrides.append(f"parallel.virtual_pipeline_stages={vpp}")
    got = run_distributed(_train, world, overrides, str(hf), str(tmp / f"run_{out.name}"), TOTAL)[-1]
    assert got["resumed"].item() and got["start"].item() == CUT
    # the first step after the cut is the checkpoint's weights on the same batch: the outputs at this layout;
    # the second also needs the re-cut Adam moments and fp32 master
    torch.testing.assert_close(got["losses"], ref["losses"][CUT:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"][CUT:], atol=1e-4, rtol=1e-4)


def test_hf_to_tp2pp2_to_tp1pp1_export_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=6)
    conv, resh = tmp_path / "tp2pp2", tmp_path / "tp1pp1"
    for cmd in (
        [
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
        ["tools/reshard_checkpoint.py", "--in", str(conv), "--out", str(resh), "--tp", "1", "--pp", "1"],
        ["tools/export_hf.py", "--in", str(conv), "--out", str(tmp_path / "export_a")],
        ["tools/export_hf.py", "--in", str(resh), "--out", str(tmp_path / "export_b")],
    ):
        r = _tool(*cmd)
        assert r.returncode == 0, f"{cmd[0]}: {r.stderr[-3000:]}"
    a, b = load_file(str(tmp_path / "export_b" / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(str(hf)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(tmp_path / "export_b")).eval()(ids).logits
    assert torch.equal(got, ref)
    # the image side survives the TP/PP re-cut bit for bit, and the replica is the image_in copy
    ia = load_file(str(tmp_path / "export_a" / "megafusion_image.safetensors"))
    ib = load_file(str(tmp_path / "export_b" / "megafusion_image.safetensors"))
    assert ia.keys() == ib.keys() and all(torch.equal(ia[k], ib[k]) for k in ia)
    one = load_file(str(resh / "model" / "tp0_pp0.safetensors"))
    assert not any("skip_encoder_replica" in k for k in one)  # a single stage has no replica
    last = load_file(str(conv / "model" / "tp1_pp1.safetensors"))
    first = load_file(str(conv / "model" / "tp1_pp0.safetensors"))
    assert torch.equal(last["0.skip_encoder_replica.conv_in.weight"], first["0.core.image_in.conv_in.weight"])


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) - 100]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_shard_is_named(tmp_path, how):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=7)
    conv = tmp_path / "conv"
    assert (
        _tool(
            "tools/convert_hf_llama.py",
            "--hf-dir",
            str(hf),
            "--out",
            str(conv),
            "--tp",
            "2",
            "--pp",
            "1",
            "--config",
            "tiny",
        ).returncode
        == 0
    )
    bad = conv / "model" / "tp1_pp0.safetensors"
    _corrupt(bad, how)
    r = _tool(
        "tools/reshard_checkpoint.py", "--in", str(conv), "--out", str(tmp_path / "out"), "--tp", "1", "--pp", "1"
    )
    assert r.returncode == 1
    assert str(bad) in r.stderr and ("truncated" if how == "truncate" else "corrupted") in r.stderr
    assert not (tmp_path / "out").exists()


def test_impossible_layout_is_refused(tmp_path):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "base", seed=8)
    conv = tmp_path / "conv"
    assert (
        _tool(
            "tools/convert_hf_llama.py",
            "--hf-dir",
            str(hf),
            "--out",
            str(conv),
            "--tp",
            "1",
            "--pp",
            "1",
            "--config",
            "tiny",
        ).returncode
        == 0
    )
    r = _tool(
        "tools/reshard_checkpoint.py",
        "--in",
        str(conv),
        "--out",
        str(tmp_path / "out"),
        "--tp",
        "1",
        "--pp",
        "3",
        "--dp",
        "3",
    )
    assert r.returncode == 1
    assert "layers 4 not divisible by 3" in r.stderr and "global_batch_size" in r.stderr
