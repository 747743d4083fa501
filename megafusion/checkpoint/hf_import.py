"""Load a Hugging Face Llama directory (safetensors) into LlamaFusion's text tower.

Streams tensor by tensor with plain reads (``SafetensorsDir``) and reads only the
rows/columns of this TP rank, so memory stays near one tensor slice. Nothing is
unpickled: ``*.bin`` (pickle) checkpoints are refused with a message saying how
to convert them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megafusion.checkpoint.tensor_file import TensorFile
from megafusion.config.schema import ImageConfig, ModelConfig, RopeScalingConfig

LLAMA3_VOCAB = 128256


class HFCheckpointError(ValueError):
    """The HF directory is missing something or does not describe a Llama we can load."""


def read_hf_config(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{cfg_path} not found: not a Hugging Face model directory")
    return json.loads(cfg_path.read_text())


def model_config_from_hf(hf: dict, image: ImageConfig | None = None, **overrides: Any) -> ModelConfig:
    """ModelConfig from a HF LlamaConfig dict (either the v4 ``rope_scaling`` or v5 ``rope_parameters`` form).

    <BOI>/<EOI> default to Llama-3's <|reserved_special_token_0/1|> (128002/128003)
    when the vocabulary is Llama-3's, else to the last two ids of the vocabulary.
    """
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json hidden_act={hf.get('hidden_act')!r}; Llama uses 'silu'")
    if hf.get("model_type") not in (None, "llama"):
        raise HFCheckpointError(f"config.json model_type={hf.get('model_type')!r}; only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"config.json {key}=true is not supported (Llama has no biases)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise HFCheckpointError(
            f"config.json head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}"
        )
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype in ("default", None):
        scaling = RopeScalingConfig(rope_type="none")
    elif rtype == "llama3":
        scaling = RopeScalingConfig(
            rope_type="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    else:
        raise HFCheckpointError(f"config.json rope_type={rtype!r}; supported: default, llama3")
    vocab = hf["vocab_size"]
    boi, eoi = (128002, 128003) if vocab >= LLAMA3_VOCAB else (vocab - 2, vocab - 1)
    kw: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        boi_token_id=boi,
        eoi_token_id=eoi,
    )
    if image is not None:
        kw["image"] = image
    kw.update(overrides)
    return ModelConfig(**kw)


class SafetensorsDir:
    """Tensor-by-tensor reader over ``model.safetensors`` or a sharded ``*.index.json`` directory.

    Reads with plain preads (``tensor_file.TensorFile``), not memory maps: every page of a mapped
    file that a reader touches counts towards its resident memory until the file is closed, so a
    conversion of a large Llama would hold all of it. Here only the slices asked for are read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with TensorFile(single) as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            if list(self.path.glob("*.bin")):
                raise HFCheckpointError(
                    f"{self.path} holds pickle (*.bin) weights, which megafusion does not unpickle; "
                    "re-save them with save_pretrained(..., safe_serialization=True)"
                )
            raise HFCheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[str, TensorFile] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> TensorFile:
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = TensorFile(self.path / fname)
        return self._handles[fname]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        f = self._file(name)
        return f.read_flat(name, 0, f.numel(name)).view(f.shape(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file(name).read_rows(name, start, stop)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).shape(name))

    def tp_rows(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """This TP rank's block of output rows (column-parallel layout)."""
        step = self.shape(name)[0] // tp
        return self.rows(name, rank * step, (rank + 1) * step)

    def tp_cols(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """This TP rank's block of input columns (row-parallel layout), read in row chunks."""
        step = self.shape(name)[1] // tp
        return self._file(name).read_cols(name, rank * step, (rank + 1) * step)


LAYER_SOURCES = {  # routed-layer tensor -> the HF tensors it is made of (for error messages)
    "qkv.weight": "self_attn.{q,k,v}_proj.weight",
    "qkv.norm": "input_layernorm.weight",
    "o.weight": "self_attn.o_proj.weight",
    "gate_up.weight": "mlp.{gate,up}_proj.weight",
    "gate_up.norm": "post_attention_layernorm.weight",
    "down.weight": "mlp.down_proj.weight",
}


def layer_shards(r: SafetensorsDir, layer: int | str, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """HF layer ``layer`` as one tower of a routed layer on TP rank ``rank`` (fused per-rank qkv / gate_up)."""
    p = f"model.layers.{layer}."
    return {
        "qkv.weight": torch.cat([r.tp_rows(p + f"self_attn.{x}_proj.weight", tp, rank) for x in "qkv"], 0),
        "qkv.norm": r.get(p + "input_layernorm.weight"),
        "o.weight": r.tp_cols(p + "self_attn.o_proj.weight", tp, rank),
        "gate_up.weight": torch.cat([r.tp_rows(p + f"mlp.{x}_proj.weight", tp, rank) for x in ("gate", "up")], 0),
        "gate_up.norm": r.get(p + "post_attention_layernorm.weight"),
        "down.weight": r.tp_cols(p + "mlp.down_proj.weight", tp, rank),
    }


def special_rows(r: SafetensorsDir, boi: int, eoi: int) -> torch.Tensor:
    """The embedding rows of <BOI> and <EOI> [2, h]."""
    name = "model.embed_tokens.weight"
    return torch.cat([r.rows(name, t, t + 1) for t in (boi, eoi)])


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise HFCheckpointError(f"{what}: checkpoint shard shape {tuple(src.shape)} != model shape {tuple(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


@torch.no_grad()
def load_hf_llama(model, path: str | Path) -> None:
    """Copy this rank's shards of the HF Llama weights into ``model``'s text tower (any TP, any stage)."""
    r = SafetensorsDir(path)
    try:
        _load_text_tower(model, r, path)
    finally:
        r.close()


def _load_text_tower(model, r: SafetensorsDir, path: str | Path) -> None:
    cfg, tp, rank = model.cfg, model.pctx.tp_size, model.pctx.tp_rank
    n_layers_hf = sum(1 for k in r.weight_map if k.endswith("self_attn.q_proj.weight"))
    if n_layers_hf != cfg.num_layers:
        raise HFCheckpointError(f"{path}: checkpoint has {n_layers_hf} layers, model.num_layers={cfg.num_layers}")

    def vocab_rows(name: str) -> torch.Tensor:  # this rank's rows of the padded vocab, zeros past the end
        per = model.padded_vocab // tp
        a, b = rank * per, (rank + 1) * per
        vocab = r.shape(name)[0]
        out = torch.zeros(per, r.shape(name)[1], dtype=torch.float32)
        if a < vocab:
            real = r.rows(name, a, min(b, vocab))
            out = out.to(real.dtype)
            out[: real.shape[0]] = real
        return out

    if model.pre_process:
        name = "model.embed_tokens.weight"
        _copy(model.embedding.weight, vocab_rows(name), name)
        _copy(
            model.special_embedding, special_rows(r, cfg.boi_token_id, cfg.eoi_token_id), "<BOI>/<EOI> embedding rows"
        )
    for key, layer in model.layers.items():
        for rel, t in layer_shards(r, key, tp, rank).items():
            proj, kind = rel.split(".")
            dst = getattr(layer, proj).text.weight if kind == "weight" else getattr(layer, proj).norm.text
            _copy(dst, t, f"model.layers.{key}.{LAYER_SOURCES[rel]}")
    if model.post_process:
        _copy(model.final_norm.weight, r.get("model.norm.weight"), "model.norm.weight")
        head_name = "lm_head.weight" if "lm_head.weight" in r else "model.embed_tokens.weight"
        if head_name != "lm_head.weight" and not cfg.tie_word_embeddings:
            raise HFCheckpointError(f"{path}: lm_head.weight missing and tie_word_embeddings is false")
        _copy(model.lm_head.weight, vocab_rows(head_name), head_name)


__all__ = ["HFCheckpointError", "SafetensorsDir", "load_hf_llama", "model_config_from_hf", "read_hf_config"]
