"""Checkpoint tools at real 8B widths stay within their memory budget: convert, reshard, export stream.

The model is Llama-3.1-8B-shaped (hidden 4096, FFN 14336, vocab 128256, 32/8 heads) with two
layers, bf16, random weights written straight to safetensors. Each tool runs in a fresh
interpreter that resets its RSS high-water mark after imports (``/proc/self/clear_refs``), so the
peak measured is the tool's own work. Budget (issue 16): 2 x the largest tensor the tool handles +
the largest output shard it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
from megafusion.checkpoint.convert import convert_hf_llama
from megafusion.checkpoint.export import export_checkpoint
from megafusion.checkpoint.reshard import reshard_checkpoint
from megafusion.config import load_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

job, src, out = sys.argv[1:4]
cfg = load_config("llama3-8b-fusion") if job == "convert" else None
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: the peak below is the tool's own
if job == "convert":
    convert_hf_llama(src, out, cfg, tp=2, pp=2, progress=False)
elif job == "reshard":
    reshard_checkpoint(src, out, 1, 1, progress=False, log=lambda s: None)
else:
    export_checkpoint(src, out, log=lambda s: None)
print(json.dumps({{"base": base, "peak": status("VmHWM:")}}))
"""


def _write_8b_width_llama(path: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    h, f, v, hd = 4096, 14336, 128256, 128
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=h,
        intermediate_size=f,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        dtype="bfloat16",
    )
    path.mkdir(parents=True)
    cfg.to_json_file(str(path / "config.json"))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h), "model.norm.weight": w(h)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(8 * hd, h),
            p + "self_attn.v_proj.weight": w(8 * hd, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
            p + "input_layernorm.weight": w(h),
            p + "post_attention_layernorm.weight": w(h),
        }
    save_file(t, str(path / "model.safetensors"))
    return path


def _peak(job: str, src: Path, out: Path) -> int:
    code = _CHILD.format(root=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", code, job, str(src), str(out)], capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    return rec["peak"] - rec["base"]


def _largest_tensor(index: dict) -> int:
    size = {"BF16": 2, "F16": 2, "F32": 4}
    return max(
        size[e["dtype"]] * int(torch.Size(e["shape"]).numel())
        for rel, info in index.items()
        for e in info.get("tensors", {}).values()
    )


@pytest.mark.slow
def test_convert_reshard_export_stream_at_8b_width(tmp_path):
    from safetensors import safe_open

    from megafusion.checkpoint.export import IMAGE_FILE

    hf = _write_8b_width_llama(tmp_path / "hf")
    conv, one, exp = tmp_path / "conv", tmp_path / "tp1", tmp_path / "export"
    results = {}
    for job, src, out in (("convert", hf, conv), ("reshard", conv, one), ("export", one, exp)):
        results[job] = _peak(job, src, out)
    conv_index = json.loads((conv / "index.json").read_text())
    one_index = json.loads((one / "index.json").read_text())
    largest = _largest_tensor(one_index)  # the largest image-side tensor in full: gate_up, 2 x 14336 x 4096 bf16
    assert largest == 2 * 14336 * 4096 * 2
    shard = {
        "convert": max(v["bytes"] for v in conv_index.values()),
        "reshard": max(v["bytes"] for v in one_index.values()),
        "export": (exp / IMAGE_FILE).stat().st_size,
    }
    report = {
        job: f"{results[job] / 2**20:.0f} MiB (budget {(2 * largest + shard[job]) / 2**20:.0f})" for job in results
    }
    print(report)
    for job, peak in results.items():
        assert peak <= 2 * largest + shard[job], report
    # the export is complete and right: full tensors equal to the HF layer they were copied from
    with safe_open(str(exp / IMAGE_FILE), framework="pt") as f, safe_open(str(hf / "model.safetensors"), "pt") as h:
        assert torch.equal(
            f.get_tensor("layers.1.down.image.weight"), h.get_tensor("model.layers.1.mlp.down_proj.weight")
        )
