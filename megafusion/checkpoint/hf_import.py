"""Load a Hugging Face Llama directory (safetensors) into LlamaFusion's text tower.

A LLaVA directory (``LlavaForConditionalGeneration``, model_type 'llava') is a Llama too: its
``text_config`` gives the text tower's dims, its language-model tensors load by the same names
under the LLaVA's prefixes (``SafetensorsDir`` resolves both the hub layout
``language_model.model.*`` and ``model.language_model.*``), and its CLIP vision tower and
projector load into the frozen ``model.vision_tower.VisionPath`` (LLaVA-Fusion).

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
from megafusion.model.vision_tower import ACTIVATIONS, VisionSpec

LLAMA3_VOCAB = 128256
VLM_TYPES = ("llava",)
"""config.json model_type values of vision-language models loaded as LLaVA-Fusion."""


class HFCheckpointError(ValueError):
    """The HF directory is missing something or does not describe a Llama we can load."""


def read_hf_config(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{cfg_path} not found: not a Hugging Face model directory")
    return json.loads(cfg_path.read_text())


LLAMA_CONFIG_DEFAULTS = {  # transformers' LlamaConfig defaults, which a LLaVA's text_config may leave out
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def text_config_of(hf: dict) -> dict:
    """The language model's part of a config.json: itself for a Llama, ``text_config`` for a LLaVA.

    The hub's LLaVA configs (llava-hf/llava-1.5-7b-hf) list only the text keys that differ from
    LlamaConfig's defaults, which transformers fills in; so does this.
    """
    kind = hf.get("model_type")
    if kind in VLM_TYPES:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise HFCheckpointError(f"config.json model_type={kind!r} without a text_config")
        if text.get("model_type", "llama") != "llama":
            raise HFCheckpointError(
                f"config.json text_config.model_type={text.get('model_type')!r}; LLaVA-Fusion needs a Llama"
            )
        return {**LLAMA_CONFIG_DEFAULTS, **text}
    if kind is not None and (kind.startswith("llava") or "vision_config" in hf):
        raise HFCheckpointError(
            f"config.json model_type={kind!r} is not supported: vision-language models load as "
            f"LLaVA-Fusion only in the LLaVA-1.5 layout (model_type {', '.join(map(repr, VLM_TYPES))})"
        )
    return hf


def vision_spec_from_hf(hf: dict) -> VisionSpec | None:
    """The frozen vision path of a LLaVA config.json (None for a text-only Llama).

    Only a CLIP vision tower is supported; anything else is an error naming the key.
    """
    if hf.get("model_type") not in VLM_TYPES:
        return None
    v = hf.get("vision_config") or {}
    if v.get("model_type") != "clip_vision_model":
        raise HFCheckpointError(
            f"config.json vision_config.model_type={v.get('model_type')!r} is not supported "
            "(LLaVA-Fusion loads a CLIP vision tower: 'clip_vision_model')"
        )
    for key, value in (
        ("vision_config.hidden_act", v.get("hidden_act", "quick_gelu")),
        ("projector_hidden_act", hf.get("projector_hidden_act", "gelu")),
    ):
        if value not in ACTIVATIONS:
            raise HFCheckpointError(f"config.json {key}={value!r}; supported: {', '.join(ACTIVATIONS)}")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise HFCheckpointError(f"config.json vision_feature_select_strategy={strategy!r}; supported: default, full")
    layers = hf.get("vision_feature_layer", -2)
    layers = (layers,) if isinstance(layers, int) else tuple(int(i) for i in layers)
    n = int(v.get("num_hidden_layers", 12))
    bad = [i for i in layers if not -(n + 1) <= i <= n]
    if bad:
        raise HFCheckpointError(f"config.json vision_feature_layer={bad} outside the {n + 1} hidden states")
    token = hf.get("image_token_id", hf.get("image_token_index"))
    if token is None:
        raise HFCheckpointError("config.json has no image_token_id / image_token_index")
    hidden = int(v.get("hidden_size", 768))
    return VisionSpec(
        hidden_size=hidden,
        intermediate_size=int(v.get("intermediate_size", 3072)),
        num_layers=n,
        num_heads=int(v.get("num_attention_heads", 12)),
        image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 32)),
        num_channels=int(v.get("num_channels", 3)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        hidden_act=v.get("hidden_act", "quick_gelu"),
        text_hidden_size=int(text_config_of(hf)["hidden_size"]),
        projector_act=hf.get("projector_hidden_act", "gelu"),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        feature_layers=layers,
        keep_cls=strategy == "full",
        image_token_id=int(token),
    )


def model_config_from_hf(hf: dict, image: ImageConfig | None = None, **overrides: Any) -> ModelConfig:
    """ModelConfig from a HF LlamaConfig dict (either the v4 ``rope_scaling`` or v5 ``rope_parameters`` form),
    or from a LLaVA config.json (its ``text_config``).

    <BOI>/<EOI> default to Llama-3's <|reserved_special_token_0/1|> (128002/128003)
    when the vocabulary is Llama-3's, else to the last two ids of the vocabulary.
    """
    hf = text_config_of(hf)
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


def _llava_names(name: str) -> tuple[str, ...]:
    """Where a LLaVA directory may store ``name`` (hub v4 layout first, then transformers v5's)."""
    if name.startswith("model."):
        rest = name[len("model.") :]
        return (f"language_model.model.{rest}", f"model.language_model.{rest}")
    if name == "lm_head.weight":
        return ("language_model.lm_head.weight",)
    if name.startswith("vision.tower."):
        rest = name[len("vision.tower.") :]
        return tuple(
            f"{p}{rest}"
            for p in (
                "vision_tower.vision_model.",
                "vision_tower.",
                "model.vision_tower.vision_model.",
                "model.vision_tower.",
            )
        )
    if name.startswith("vision.projector."):
        rest = name[len("vision.projector.") :]
        return (f"multi_modal_projector.{rest}", f"model.multi_modal_projector.{rest}")
    return ()


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

    def stored_name(self, name: str) -> str | None:
        """The name a Llama tensor (``model.layers.0...``, ``lm_head.weight``) or a vision-path tensor
        (``vision.tower.*``, ``vision.projector.*``) is stored under here: as is in a Llama directory, under
        one of the LLaVA prefixes in a LLaVA directory (the hub's v4 layout or transformers v5's)."""
        if name in self.weight_map:
            return name
        for stored in _llava_names(name):
            if stored in self.weight_map:
                return stored
        return None

    def __contains__(self, name: str) -> bool:
        return self.stored_name(name) is not None

    def text_layer_count(self) -> int:
        """Decoder layers of the language model (a LLaVA's vision layers have q_proj tensors too)."""
        n = 0
        while f"model.layers.{n}.self_attn.q_proj.weight" in self:
            n += 1
        return n

    def _file(self, name: str) -> tuple[TensorFile, str]:
        stored = self.stored_name(name)
        if stored is None:
            raise HFCheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        fname = self.weight_map[stored]
        if fname not in self._handles:
            self._handles[fname] = TensorFile(self.path / fname)
        return self._handles[fname], stored

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        f, key = self._file(name)
        return f.read_flat(key, 0, f.numel(key)).view(f.shape(key))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        f, key = self._file(name)
        return f.read_rows(key, start, stop)

    def shape(self, name: str) -> list[int]:
        f, key = self._file(name)
        return list(f.shape(key))

    def tp_rows(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """This TP rank's block of output rows (column-parallel layout)."""
        step = self.shape(name)[0] // tp
        return self.rows(name, rank * step, (rank + 1) * step)

    def tp_cols(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """This TP rank's block of input columns (row-parallel layout), read in row chunks."""
        step = self.shape(name)[1] // tp
        f, key = self._file(name)
        return f.read_cols(key, rank * step, (rank + 1) * step)


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
    n_layers_hf = r.text_layer_count()
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
        if getattr(model, "vision", None) is not None:
            for vname, p in model.vision.named_parameters():
                key = f"vision.{vname}"
                if key not in r:
                    raise HFCheckpointError(
                        f"{path}: the LLaVA's {vname} tensor is missing (looked for {', '.join(_llava_names(key))})"
                    )
                _copy(p, r.get(key), r.stored_name(key) or key)
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


__all__ = [
    "HFCheckpointError",
    "SafetensorsDir",
    "load_hf_llama",
    "model_config_from_hf",
    "read_hf_config",
    "text_config_of",
    "vision_spec_from_hf",
]
