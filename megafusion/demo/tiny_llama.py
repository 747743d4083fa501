"""Write a random-weight HF Llama matching a ModelConfig (tests, demo; no download possible here)."""

from __future__ import annotations

from pathlib import Path

import torch

from megafusion.config.schema import ModelConfig
from megafusion.durable import publish

MAX_RANDOM_PARAMS = 50_000_000


def hf_llama_config(cfg: ModelConfig, **extra):
    """The transformers LlamaConfig with ``cfg``'s dimensions and RoPE scaling."""
    from transformers import LlamaConfig

    rs = cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs.rope_type == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **extra,
    )


def write_random_hf_llama(
    cfg: ModelConfig,
    path: str | Path,
    seed: int = 0,
    max_params: int | None = MAX_RANDOM_PARAMS,
    norm_noise: float = 0.0,
) -> Path:
    """Save a random LlamaForCausalLM with cfg's dimensions (safetensors) to ``path`` unless one is there.

    ``max_params`` guards against building a preset-sized random model by mistake
    (benchmarks raise it; None = no limit). ``norm_noise`` > 0 sets every RMSNorm weight to
    1 + norm_noise x N(0, 1) (HF initialises them to 1), so tests see per-tower norms matter.
    """
    from transformers import LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    approx = cfg.num_layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.ffn_hidden_size)
    if max_params is not None and approx > max_params:
        raise ValueError(
            f"refusing to build a random {approx / 1e9:.1f}B-parameter Llama: set checkpoint.hf_llama to a "
            "real Hugging Face Llama directory for this preset"
        )
    hf_cfg = hf_llama_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_cfg)
        if norm_noise:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight"):
                        p.copy_(1.0 + norm_noise * torch.randn_like(p))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    publish(tmp, path)
    return path
