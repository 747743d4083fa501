"""Cross-field checks run before anything is built or spawned.

Each rule yields one line naming the key(s) and the values at fault; all
failing rules are reported together so a user fixes a config in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.config.loader import ConfigError
from megafusion.config.schema import ARCHITECTURES, BACKENDS, DEVICES, PARAMS_DTYPES, Config, ModelConfig


@dataclass(frozen=True)
class SplitProblem:
    """One size of the model that a TP x PP (x VPP) cut does not divide."""

    what: str  # "layers"
    key: str  # "model.num_layers"
    value: int
    by: str  # the cut's keys: "parallel.pipeline_parallel=2 x parallel.virtual_pipeline_stages=4 = 8"
    divisor: int

    def __str__(self) -> str:
        return f"{self.key}={self.value} is not divisible by {self.by}"

    def short(self) -> str:
        """Without config keys, for tools whose layout comes from flags: 'layers 4 not divisible by 3'."""
        return f"{self.what} {self.value} not divisible by {self.divisor}"


def split_problems(m: ModelConfig, tp: int, pp: int, vpp: int | None = None) -> list[SplitProblem]:
    """Can ``m`` be cut as TP x PP (x VPP)? Heads, kv heads and FFN over TP, layers over PP x VPP.

    The one statement of these rules: config validation, the converter, the resharder and the
    planner's candidate layouts all ask here.
    """
    tp_key = f"parallel.tensor_parallel={tp}"
    out = [
        SplitProblem(what, key, val, tp_key, tp)
        for what, key, val in (
            ("attention heads", "model.num_attention_heads", m.num_attention_heads),
            ("kv heads", "model.num_kv_heads", m.num_kv_heads),
            ("ffn size", "model.ffn_hidden_size", m.ffn_hidden_size),
        )
        if val % tp
    ]
    chunks = pp * (vpp or 1)
    if m.num_layers % chunks:
        by = (
            f"parallel.pipeline_parallel={pp} x parallel.virtual_pipeline_stages={vpp} = {chunks}"
            if vpp
            else f"parallel.pipeline_parallel={pp}"
        )
        out.append(SplitProblem("layers", "model.num_layers", m.num_layers, by, chunks))
    return out


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def config_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every violated rule as a one-line message (empty list = valid)."""
    m, p, img = cfg.model, cfg.parallel, cfg.model.image
    errs: list[str] = []
    tp, pp = p.tensor_parallel, p.pipeline_parallel

    for key, val in (("parallel.tensor_parallel", tp), ("parallel.pipeline_parallel", pp)):
        if val < 1:
            errs.append(f"{key}={val} must be >= 1")
    for key, val in (
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.vocab_size", m.vocab_size),
    ):
        if val < 1:
            errs.append(f"{key}={val} must be >= 1")
    if errs:
        return errs

    if m.hidden_size % m.num_attention_heads:
        errs.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_attention_heads % m.num_kv_heads:
        errs.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_kv_heads={m.num_kv_heads} (GQA groups must be whole)"
        )
    vpp = p.virtual_pipeline_stages
    if vpp is not None and vpp < 1:
        errs.append(f"parallel.virtual_pipeline_stages={vpp} must be >= 1 or null")
    errs += [str(sp) for sp in split_problems(m, tp, pp, vpp)]
    if vpp and vpp > 1 and pp < 2:
        errs.append(f"parallel.virtual_pipeline_stages={vpp} needs parallel.pipeline_parallel >= 2 (got {pp})")
    if world_size is not None:
        dp = p.data_parallel
        if dp == -1:
            if world_size % (tp * pp):
                errs.append(
                    f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} "
                    f"x parallel.pipeline_parallel={pp}"
                )
            else:
                dp = world_size // (tp * pp)
        d = cfg.data
        if dp > 0 and d.global_batch_size % (d.micro_batch_size * dp):
            errs.append(
                f"data.global_batch_size={d.global_batch_size} is not divisible by data.micro_batch_size="
                f"{d.micro_batch_size} x data-parallel size {dp}"
            )
        elif dp > 0 and vpp and vpp > 1 and (d.global_batch_size // (d.micro_batch_size * dp)) % pp:
            errs.append(
                "interleaved pipelining needs micro-batches per step "
                f"({d.global_batch_size // (d.micro_batch_size * dp)} = data.global_batch_size / "
                f"(data.micro_batch_size x DP)) divisible by parallel.pipeline_parallel={pp}"
            )
        if (
            p.zero_stage == 2
            and dp > 0
            and d.global_batch_size != d.micro_batch_size * dp
            and d.global_batch_size % (d.micro_batch_size * dp) == 0
        ):
            errs.append(
                f"parallel.zero_stage=2 needs one micro-batch per step (data.global_batch_size="
                f"{d.global_batch_size} = data.micro_batch_size={d.micro_batch_size} x DP={dp}): DeepSpeed's "
                "stage-2 gradient hooks cannot accumulate over megatron-core's micro-batches; use zero_stage=1"
            )
        if p.data_parallel != -1 and tp * pp * dp != world_size:
            errs.append(
                f"world size {world_size} != parallel.tensor_parallel={tp} x "
                f"parallel.pipeline_parallel={pp} x parallel.data_parallel={dp} = {tp * pp * dp}"
            )
    elif p.data_parallel < 1 and p.data_parallel != -1:
        errs.append(f"parallel.data_parallel={p.data_parallel} must be >= 1 or -1 (derived)")

    if p.zero_bucket_elements < 2 or p.zero_bucket_elements % 2:
        errs.append(
            f"parallel.zero_bucket_elements={p.zero_bucket_elements} must be an even number >= 2 "
            "(DeepSpeed splits buckets in halves)"
        )
    if p.zero_stage not in (1, 2):
        errs.append(f"parallel.zero_stage={p.zero_stage} must be 1 or 2")
    elif p.zero_stage == 2 and pp > 1:
        errs.append(
            f"parallel.zero_stage=2 is not supported with parallel.pipeline_parallel={pp} "
            "(gradients must live across micro-batches); use zero_stage=1"
        )
    elif p.zero_stage == 2 and p.sequence_parallel and tp > 1:
        errs.append(
            "parallel.zero_stage=2 is not supported with parallel.sequence_parallel at "
            f"parallel.tensor_parallel={tp}: stage 2 reduces and frees gradients during backward, before the norms' "
            "partial gradients are summed over TP; use zero_stage=1"
        )
    if p.sequence_parallel and tp > 1 and cfg.data.seq_length % tp:
        errs.append(
            f"data.seq_length={cfg.data.seq_length} is not divisible by "
            f"parallel.tensor_parallel={tp} (needed by parallel.sequence_parallel=true)"
        )

    # image geometry
    if img.io not in ("unet", "linear"):
        errs.append(f"model.image.io={img.io!r} must be 'unet' or 'linear'")
    if img.position_embedding not in ("none", "sincos"):
        errs.append(f"model.image.position_embedding={img.position_embedding!r} must be 'none' or 'sincos'")
    elif img.position_embedding == "sincos" and m.hidden_size % 4:
        errs.append(f"model.image.position_embedding=sincos needs model.hidden_size={m.hidden_size} divisible by 4")
    factor = img.vae_downsample * img.patch_size
    if img.vae_downsample < 1 or img.patch_size < 1:
        errs.append(
            f"model.image.vae_downsample={img.vae_downsample} and model.image.patch_size={img.patch_size} must be >= 1"
        )
    elif img.image_size % factor:
        errs.append(
            f"model.image.image_size={img.image_size} is not divisible by model.image.vae_downsample"
            f"={img.vae_downsample} x model.image.patch_size={img.patch_size} = {factor}"
        )
    if img.io == "unet" and not _is_pow2(img.patch_size):
        errs.append(
            f"model.image.patch_size={img.patch_size} must be a power of two with model.image.io=unet "
            "(each U-Net block halves the resolution)"
        )
    if img.io == "unet" and img.unet_channels % 8:
        errs.append(f"model.image.unet_channels={img.unet_channels} must be a multiple of 8 (GroupNorm)")
    if img.timestep_embed_dim % 2:
        errs.append(f"model.image.timestep_embed_dim={img.timestep_embed_dim} must be even")

    # enums / token ids
    if m.attention_backend not in ("auto", "sdpa", "flex"):
        errs.append(f"model.attention_backend={m.attention_backend!r} must be auto, sdpa or flex")
    if p.params_dtype not in PARAMS_DTYPES:
        errs.append(f"parallel.params_dtype={p.params_dtype!r} must be auto, bf16 or fp32 (or bfloat16 / float32)")
    if p.device not in DEVICES:
        errs.append(f"parallel.device={p.device!r} must be one of {', '.join(DEVICES)}")
    if p.backend not in BACKENDS:
        errs.append(f"parallel.backend={p.backend!r} must be one of {', '.join(BACKENDS)}")
    if not p.collective_timeout_s > 0:
        errs.append(f"parallel.collective_timeout_s={p.collective_timeout_s} must be > 0 (seconds)")
    if p.device == "cpu" and p.backend == "nccl":
        errs.append("parallel.backend=nccl needs CUDA tensors, but parallel.device=cpu (use gloo, or auto)")
    if m.rope_scaling.rope_type not in ("none", "llama3"):
        errs.append(f"model.rope_scaling.rope_type={m.rope_scaling.rope_type!r} must be none or llama3")
    for key, tok in (("model.boi_token_id", m.boi_token_id), ("model.eoi_token_id", m.eoi_token_id)):
        if not 0 <= tok < m.vocab_size:
            errs.append(f"{key}={tok} is outside the vocabulary [0, model.vocab_size={m.vocab_size})")
    if m.boi_token_id == m.eoi_token_id:
        errs.append(f"model.boi_token_id and model.eoi_token_id are both {m.boi_token_id}")
    if m.architecture not in ARCHITECTURES:
        errs.append(f"model.architecture={m.architecture!r} must be one of {list(ARCHITECTURES)}")
    if cfg.diffusion.schedule != "cosine":
        errs.append(f"diffusion.schedule={cfg.diffusion.schedule!r}: only 'cosine' is implemented")
    if cfg.diffusion.prediction not in ("epsilon", "v"):
        errs.append(f"diffusion.prediction={cfg.diffusion.prediction!r} must be 'epsilon' or 'v'")
    if cfg.optim.clip_grad <= 0:
        errs.append(
            f"optim.clip_grad={cfg.optim.clip_grad} must be > 0 (the global grad norm also detects non-finite steps)"
        )
    if not 0.0 <= cfg.diffusion.caption_dropout < 1.0:
        errs.append(f"diffusion.caption_dropout={cfg.diffusion.caption_dropout} must be in [0, 1)")
    if not 1 <= cfg.diffusion.understanding_max_timestep <= cfg.diffusion.num_timesteps:
        errs.append(
            f"diffusion.understanding_max_timestep={cfg.diffusion.understanding_max_timestep} must be in "
            f"[1, diffusion.num_timesteps={cfg.diffusion.num_timesteps}]"
        )
    if not 0.0 <= cfg.data.text_ratio < 1.0:
        errs.append(f"data.text_ratio={cfg.data.text_ratio} must be in [0, 1)")
    elif cfg.data.text_ratio > 0 and not cfg.data.text_path:
        errs.append(f"data.text_ratio={cfg.data.text_ratio} needs data.text_path (text-only shards)")
    if not 0.0 <= cfg.data.caption_first_prob <= 1.0:
        errs.append(f"data.caption_first_prob={cfg.data.caption_first_prob} must be in [0, 1]")
    return errs


def validate_config(cfg: Config, world_size: int | None = None) -> Config:
    """Raise :class:`ConfigError` listing every problem, or return ``cfg`` unchanged."""
    errs = config_problems(cfg, world_size)
    if errs:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
    return cfg
