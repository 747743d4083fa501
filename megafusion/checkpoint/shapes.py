"""Which config keys describe the base Llama's weights, and the checks that the weights agree with them.

A converted checkpoint's ``config.yaml`` must describe its weights: the model dims come from
the HF ``config.json``, never from a preset. These checks turn the two ways that can go wrong
into one clear error each, before any process is spawned or any byte copied:

* a config whose model dims contradict the HF model (``dim_conflicts``: convert, launcher.train);
* a checkpoint whose stored config contradicts its own index (``index_shape_problems``: reshard,
  export), which would otherwise surface as a ``split_with_sizes`` traceback deep in a re-cut.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from megafusion.checkpoint.hf_import import model_config_from_hf, read_hf_config
from megafusion.config.schema import ModelConfig, RopeScalingConfig

MODEL_DIMS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
)
"""``model.*`` keys fixed by the base Llama (shapes and numerics). ``max_position_embeddings`` is taken from
HF too but never conflicts: it describes intent, not weights."""

HF_KEY = {  # model.* key -> the config.json key a message should name
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "tie_word_embeddings": "tie_word_embeddings",
}


def _rope(rs: RopeScalingConfig) -> Any:
    """What matters of a RoPE scaling: nothing but the type when it is 'none'."""
    if rs.rope_type == "none":
        return "none"
    return (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings)


def _show(key: str, value: Any) -> str:
    if key == "rope_scaling":
        r = _rope(value)
        return (
            "none"
            if r == "none"
            else f"{r[0]}(factor={r[1]}, low={r[2]}, high={r[3]}, original_max_position_embeddings={r[4]})"
        )
    return repr(value)


def differing_dims(
    a: ModelConfig, b: ModelConfig, keys: tuple[str, ...] | list[str] = MODEL_DIMS
) -> list[tuple[str, str, str]]:
    """(key, a's value, b's value) for each model dim on which ``a`` and ``b`` differ, values printable."""
    out = []
    for key in keys:
        x, y = getattr(a, key), getattr(b, key)
        if (_rope(x) != _rope(y)) if key == "rope_scaling" else x != y:
            out.append((key, _show(key, x), _show(key, y)))
    return out


def hf_model_config(hf_dir: str | Path) -> ModelConfig:
    """The base Llama's dims as a ModelConfig (image side and the rest at their defaults)."""
    return model_config_from_hf(read_hf_config(hf_dir))


def dim_conflicts(
    m: ModelConfig, hf_dir: str | Path, keys: tuple[str, ...] | list[str] = MODEL_DIMS, source: str = "the config"
) -> list[str]:
    """One line per model dim of ``m`` that contradicts ``hf_dir/config.json``, naming both values."""
    where = Path(hf_dir) / "config.json"
    return [
        f"model.{k}={a} in {source}, but {where} has {HF_KEY[k]}={b}"
        for k, a, b in differing_dims(m, hf_model_config(hf_dir), keys)
    ]


def with_hf_dims(m: ModelConfig, hf_dir: str | Path) -> tuple[ModelConfig, list[str]]:
    """``m`` with its model dims (and max_position_embeddings) replaced by the HF model's.

    Returns the new config and a note per dim that changed (``hidden_size 4096 -> 2048``), so a
    tool can say what it took from the HF model instead of the preset.
    """
    hf = hf_model_config(hf_dir)
    changed = [f"{k} {a} -> {b}" for k, a, b in differing_dims(m, hf, (*MODEL_DIMS, "max_position_embeddings"))]
    return replace(m, **{k: getattr(hf, k) for k in (*MODEL_DIMS, "max_position_embeddings")}), changed


# ---------------------------------------------------------------------------- checkpoint index vs config
_LAYER = re.compile(r"^\d+\.core\.layers\.(\d+)\.(qkv|o|gate_up|down)\.(image|text)\.weight$")
_NORM = re.compile(r"^\d+\.core\.layers\.(\d+)\.(qkv|gate_up)\.norm\.(image|text)$")


def _layer_shape(m: ModelConfig, proj: str, tp: int) -> tuple[int, int] | None:
    """Shape of one TP rank's shard of a routed projection's weight, or None when ``tp`` cannot split it."""
    hd = m.head_dim
    rows_cols = {
        "qkv": ((m.num_attention_heads + 2 * m.num_kv_heads) * hd, m.hidden_size, 0),
        "o": (m.hidden_size, m.num_attention_heads * hd, 1),
        "gate_up": (2 * m.ffn_hidden_size, m.hidden_size, 0),
        "down": (m.hidden_size, m.ffn_hidden_size, 1),
    }
    rows, cols, split = rows_cols[proj]
    if split == 0:
        return (rows // tp, cols) if rows % tp == 0 else None
    return (rows, cols // tp) if cols % tp == 0 else None


def index_shape_problems(m: ModelConfig, index: dict[str, Any], tp: int, limit: int = 3) -> list[str]:
    """Where the model shards listed in ``index.json`` disagree with ``m`` at TP size ``tp``.

    Checks every routed projection and norm of every layer and the <BOI>/<EOI> rows (the
    tensors the config's dims fix), and that the layers are exactly 0..num_layers-1. Returns at
    most ``limit`` lines per kind of problem, each naming the file, the tensor and both shapes.
    """
    problems: list[str] = []
    layers: set[int] = set()
    for rel in sorted(k for k in index if k.startswith("model/") and k.endswith(".safetensors")):
        for key, info in index[rel].get("tensors", {}).items():
            shape = tuple(info["shape"])
            want: tuple[int, ...] | None
            if mt := _LAYER.match(key):
                layers.add(int(mt.group(1)))
                want = _layer_shape(m, mt.group(2), tp)
            elif mt := _NORM.match(key):
                layers.add(int(mt.group(1)))
                want = (m.hidden_size,)
            elif key.endswith(".core.special_embedding"):
                want = (2, m.hidden_size)
            else:
                continue
            if want != shape and len(problems) < limit:
                problems.append(
                    f"{rel}: {key} has shape {list(shape)}, the stored config (hidden_size={m.hidden_size}, "
                    f"heads {m.num_attention_heads}/{m.num_kv_heads}, ffn_hidden_size={m.ffn_hidden_size}) at "
                    f"TP={tp} gives {list(want) if want else 'no even split'}"
                )
    if layers and layers != set(range(m.num_layers)):
        problems.append(
            f"the model shards hold layers {min(layers)}..{max(layers)} ({len(layers)} of them), the stored config "
            f"has model.num_layers={m.num_layers}"
        )
    return problems


__all__ = ["MODEL_DIMS", "dim_conflicts", "differing_dims", "hf_model_config", "index_shape_problems", "with_hf_dims"]
