"""Translate our ModelConfig into the megatron-core config objects its layers expect."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.config.schema import ModelConfig
from megafusion.parallel.process_groups import ParallelContext


def megatron_transformer_config(
    cfg: ModelConfig, pctx: ParallelContext, dtype: torch.dtype, pipeline_parallel: int = 1
) -> TransformerConfig:
    """A TransformerConfig (megatron-core's pipeline schedules want this, not a bare ModelParallelConfig).

    Weights are never initialised by megatron-core (``perform_initialization=False``):
    the text tower comes from the HF checkpoint and the image tower is copied from it.
    Where megatron-core allocates them follows ``pctx.device``, not whether the machine has CUDA.
    """
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        tensor_model_parallel_size=pctx.tp_size,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=pctx.sequence_parallel,
        use_cpu_initialization=pctx.device.type == "cpu",
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        gradient_accumulation_fusion=False,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Batched isend/irecv is only safe with NCCL's grouped semantics: with gloo, and PP=2
        # (prev rank == next rank), an activation and a gradient of equal shape can be matched
        # to the wrong receive. The unbatched path orders sends/receives by rank parity.
        batch_p2p_comm=dist.get_backend() == "nccl",
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron-style padding so every TP rank holds an equal vocab shard."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
