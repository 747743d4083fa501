"""Any Llama converts: the config shapes of each release family through convert -> reshard -> export.

The HF models are built here with ``transformers.LlamaConfig`` directly (not megafusion's writer),
random and small, but with each family's properties: vocabulary, tied or untied embeddings, RoPE
type and factor, head_dim, MHA vs GQA. Each goes convert (TP2 x PP2, the default 8B preset as
``--config``, whose dims must be replaced) -> reshard to TP1 -> export, and is checked against the
source: the converted config describes the HF model, the image tower is a bit-exact copy of the
HF layers, the exported text tower is the source's files bit for bit and loads in transformers, and
megafusion's text logits equal transformers' on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# family -> LlamaConfig kwargs: width and depth shrunk, every property the issue lists kept
FAMILIES = {
    "llama-2": dict(  # rope default, theta 10000, vocab 32000, MHA, head_dim 128
        vocab_size=32000,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.1": dict(  # llama3 rope factor 8, theta 500000, vocab 128256, GQA, head_dim 128
        vocab_size=128256,
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=640,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.2-1b": dict(  # tied embeddings, llama3 rope factor 32, head_dim 64, GQA
        vocab_size=128256,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.2-3b": dict(  # tied embeddings, llama3 rope factor 32, head_dim 128, GQA 3:1
        vocab_size=128256,
        hidden_size=768,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1024,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "tinyllama": dict(  # GQA 32/4 (8:1), vocab 32000, theta 10000, head_dim 64 (hidden 2048 as released)
        vocab_size=32000,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def _write_family(path: Path, family: str, seed: int = 0) -> Path:
    """Random weights (bf16 on disk, as releases are) with norms away from 1 so per-tower norms matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(FAMILIES[family])
    if "rope_parameters" not in kw:
        kw["rope_parameters"] = dict(rope_type="default", rope_theta=kw.pop("rope_theta"))
    cfg = LlamaConfig(num_hidden_layers=2, **kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_convert_reshard_export(tmp_path, family):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megafusion import LlamaFusion
    from megafusion.checkpoint.convert import convert_hf_llama
    from megafusion.checkpoint.export import export_checkpoint
    from megafusion.checkpoint.files import read_checkpoint_files
    from megafusion.checkpoint.reshard import reshard_checkpoint
    from megafusion.config import load_config

    hf = _write_family(tmp_path / "hf", family)
    hf_json = json.loads((hf / "config.json").read_text())
    cfg = load_config("llama3-8b-fusion", ["model.image.unet_channels=32", "model.image.timestep_embed_dim=32"])
    notes: list[str] = []
    conv = convert_hf_llama(hf, tmp_path / "conv", cfg, tp=2, pp=2, progress=False, log=notes.append)
    assert notes and "hidden_size 4096 ->" in notes[0], notes  # the preset's dims were replaced, and it says so
    _, _, saved = read_checkpoint_files(conv)
    m = saved.model
    assert (m.hidden_size, m.num_layers, m.vocab_size) == (hf_json["hidden_size"], 2, hf_json["vocab_size"])
    assert (m.num_attention_heads, m.num_kv_heads) == (
        hf_json["num_attention_heads"],
        hf_json["num_key_value_heads"],
    )
    assert m.tie_word_embeddings == hf_json["tie_word_embeddings"]
    rope = hf_json.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        assert (m.rope_scaling.rope_type, m.rope_scaling.factor) == ("llama3", rope["factor"])
    else:
        assert m.rope_scaling.rope_type == "none" and m.rope_theta == 10000.0
    assert (saved.parallel.tensor_parallel, saved.parallel.pipeline_parallel) == (2, 2)
    assert m.boi_token_id < m.vocab_size and m.eoi_token_id < m.vocab_size
    if m.vocab_size == 128256:  # Llama-3's reserved special tokens 0 and 1
        assert (m.boi_token_id, m.eoi_token_id) == (128002, 128003)

    one = reshard_checkpoint(conv, tmp_path / "tp1", tp=1, pp=1, progress=False, log=lambda s: None)
    # the image tower of the re-cut checkpoint is an exact copy of the HF layers
    src = load_file(str(hf / "model.safetensors"))
    got = load_file(str(one / "model" / "tp0_pp0.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.cat([src[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(got[f"0.core.layers.{i}.qkv.image.weight"], qkv)
        assert torch.equal(got[f"0.core.layers.{i}.down.image.weight"], src[p + "mlp.down_proj.weight"])
        assert torch.equal(got[f"0.core.layers.{i}.gate_up.norm.image"], src[p + "post_attention_layernorm.weight"])

    out = export_checkpoint(one, tmp_path / "export", log=lambda s: None)
    a = load_file(str(out / "model.safetensors"))
    assert a.keys() == src.keys() and all(torch.equal(a[k], src[k]) for k in a)
    ids = torch.randint(0, m.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()(ids).logits
        back = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
        assert torch.equal(back, ref)
        ours = LlamaFusion.from_pretrained(str(out)).text_logits(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _hf_96(path: Path) -> Path:
    """The issue's example: hidden 96, 6/2 heads, vocab 1003, through megafusion's writer."""
    from tests.helpers import make_tiny_hf_llama

    return make_tiny_hf_llama(path, vocab=1003, hidden=96, heads=6, kv_heads=2, ffn=160, layers=2)


def test_contradicting_dims_are_one_clear_error(tmp_path):
    hf = _hf_96(tmp_path / "hf")
    # convert: a dim stated on the command line must agree with the HF model
    r = _tool(
        "tools/convert_hf_llama.py",
        *("--hf-dir", str(hf), "--out", str(tmp_path / "c"), "--tp", "2", "--pp", "1", "--config", "tiny"),
        "model.hidden_size=128",
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "model.hidden_size=128" in r.stderr and "hidden_size=96" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()
    # launcher.train --check: the preset's dims against checkpoint.hf_llama, before any process group
    r = _tool("-m", "launcher.train", "--check", "--config", "tiny", f"checkpoint.hf_llama={hf}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.hidden_size=128 in the config" in r.stderr and "hidden_size=96" in r.stderr, r.stderr
    assert "num_attention_heads=6" in r.stderr and "vocab_size=1003" in r.stderr


def test_preset_dims_replaced_and_stored_config_checked(tmp_path):
    """The issue's reproduction: convert with a preset of other dims at TP2 x PP2, then reshard works;
    a checkpoint whose config.yaml was edited to other dims is refused by reshard and export, naming the tensor."""
    import yaml

    hf = _hf_96(tmp_path / "hf")
    conv = tmp_path / "conv"
    r = _tool(
        "tools/convert_hf_llama.py",
        *("--hf-dir", str(hf), "--out", str(conv), "--tp", "2", "--pp", "2", "--config", "tiny"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model dims from" in r.stdout and "hidden_size 128 -> 96" in r.stdout, r.stdout
    # the written config.yaml is a training config for these weights; another model's config is refused
    env = dict(os.environ, WORLD_SIZE="4")
    check = [sys.executable, "-m", "launcher.train", "--check", f"checkpoint.hf_llama={hf}", f"checkpoint.load={conv}"]
    r = subprocess.run(
        check + ["--config", str(conv / "config.yaml")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "launcher.train", "--check", "--config", "tiny", f"checkpoint.load={conv}"],
        cwd=ROOT,
        env=dict(os.environ, WORLD_SIZE="1"),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "is of another model" in r.stderr and "model.boi_token_id=510" in r.stderr, r.stderr
    r = _tool(
        "tools/reshard_checkpoint.py", "--in", str(conv), "--out", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # now break the stored config: reshard and export must say so, not crash in a split
    raw = yaml.safe_load((tmp_path / "tp1" / "config.yaml").read_text())
    raw["model"]["hidden_size"] = 128
    (tmp_path / "tp1" / "config.yaml").write_text(yaml.safe_dump(raw))
    r = _tool(
        "tools/reshard_checkpoint.py",
        "--in",
        str(tmp_path / "tp1"),
        "--out",
        str(tmp_path / "x"),
        "--tp",
        "2",
        "--pp",
        "1",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "does not describe its weights" in r.stderr and "norm.image has shape [96]" in r.stderr
    assert "hidden_size=128" in r.stderr
    r = _tool("tools/export_hf.py", "--in", str(tmp_path / "tp1"), "--out", str(tmp_path / "e"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "does not describe its weights" in r.stderr, r.stderr
