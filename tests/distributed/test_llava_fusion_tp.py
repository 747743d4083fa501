"""LLaVA-Fusion at TP=2 (gloo) and through convert -> reshard -> export, against transformers' LLaVA."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import TINY_IMAGE, make_tiny_hf_llava, run_distributed
from tests.unit.test_llava_fusion import BOI, EOI, understanding_inputs

ROOT = Path(__file__).resolve().parents[2]


def _hf(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def _tp_worker(rank, world, path):
    from megafusion import LlamaFusion
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel

    init_model_parallel(world, 1)
    m = LlamaFusion.from_hf_llama(
        path, image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI, pctx=ParallelContext.current()
    ).eval()
    assert m.pctx.tp_size == world
    ids, pix = understanding_inputs()
    c_ids, c_pix = understanding_inputs(seed=1, s=24, starts=(1, 6))
    with torch.no_grad():
        logits = m.text_logits(ids, pixel_values=pix)
    return {"logits": logits, "captions": m.generate_text(c_ids, max_new_tokens=12, pixel_values=c_pix)}


def test_tp2_understanding_equals_transformers(tmp_path):
    path = make_tiny_hf_llava(tmp_path / "llava", seed=3)
    ranks = run_distributed(_tp_worker, 2, str(path))
    ref = _hf(path)
    ids, pix = understanding_inputs()
    c_ids, c_pix = understanding_inputs(seed=1, s=24, starts=(1, 6))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pix).logits
        captions = ref.generate(input_ids=c_ids, pixel_values=c_pix, max_new_tokens=12, do_sample=False)
    for r in ranks:
        assert (r["logits"] - want).abs().max().item() <= 1e-4
        assert r["captions"].tolist() == captions.tolist()


def _tool(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_convert_reshard_export_keeps_the_vlm(tmp_path):
    """HF LLaVA -> TP2 checkpoint -> TP1 -> export: the VLM's files come back bit for bit and load in transformers;
    LlamaFusion.from_pretrained gives the VLM's understanding logits and the converted image tower."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from megafusion import LlamaFusion

    src = make_tiny_hf_llava(tmp_path / "llava", seed=4)
    conv, rs, out = tmp_path / "conv", tmp_path / "tp1", tmp_path / "exported"
    _tool(
        "tools/convert_hf_llama.py",
        "--hf-dir",
        str(src),
        "--out",
        str(conv),
        "--tp",
        "2",
        "--pp",
        "1",
        "--config",
        "tiny",
        f"model.boi_token_id={BOI}",
        f"model.eoi_token_id={EOI}",
    )
    _tool("tools/reshard_checkpoint.py", "--in", str(conv), "--out", str(rs), "--tp", "1", "--pp", "1", "--no-progress")
    _tool("tools/export_hf.py", "--in", str(rs), "--out", str(out))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    ids, pix = understanding_inputs(seed=7)
    with torch.no_grad():
        want = _hf(src)(input_ids=ids, pixel_values=pix).logits
        assert torch.equal(
            LlavaForConditionalGeneration.from_pretrained(str(out)).eval()(input_ids=ids, pixel_values=pix).logits, want
        )
        model = LlamaFusion.from_pretrained(str(out)).eval()
        assert (model.text_logits(ids, pixel_values=pix) - want).abs().max().item() <= 1e-4
    # the image tower is the converted copy of the language model's layers, bit for bit
    q = torch.cat([b[f"language_model.model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(model.layers["1"].qkv.image.weight, q)
    assert model.vision is not None and not any(p.requires_grad for p in model.vision.parameters())
