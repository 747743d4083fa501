"""The one configuration tree of megafusion.

Every knob a run has lives in one of these dataclasses; YAML presets and
``key.sub=value`` overrides fill them (see ``loader.py``) and ``validate.py``
checks them before any process group, model or worker exists. Field docstrings
are the reference documentation: keep them true.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("llamafusion", "transfusion")
"""model.architecture values: the recipe, and the paper's one-tower baseline."""
PARAMS_DTYPES = ("auto", "bf16", "fp32", "bfloat16", "float32")
"""parallel.params_dtype values (the short names are the documented ones)."""
DEVICES = ("auto", "cuda", "cpu")
"""parallel.device values."""
BACKENDS = ("auto", "nccl", "gloo")
"""parallel.backend values."""


@dataclass
class RopeScalingConfig:
    """Llama-3.1 style RoPE frequency scaling ("llama3" rope_type in HF)."""

    rope_type: str = "none"
    """'none' (plain RoPE) or 'llama3' (Llama-3.1 long-context scaling)."""
    factor: float = 8.0
    """Divisor applied to low frequencies."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length of the pre-scaling model."""


@dataclass
class ImageConfig:
    """How VAE latents enter and leave the transformer."""

    image_size: int = 256
    """Pixel resolution of training images (square)."""
    vae_downsample: int = 8
    """Spatial reduction factor of the VAE (256 px -> 32x32 latents for 8)."""
    latent_channels: int = 4
    """Channels of a VAE latent."""
    io: str = "unet"
    """'unet' (the paper's 2-block U-Net down/up-sampler with skips) or 'linear' (patchifier)."""
    patch_size: int = 2
    """Latent pixels per token side: the U-Net downsamples by this factor, the patchifier cuts patches of it."""
    unet_channels: int = 256
    """Channels of the first U-Net block; the second block uses twice as many."""
    timestep_embed_dim: int = 256
    """Width of the sinusoidal timestep embedding fed to the U-Net / patchifier MLP."""
    position_embedding: str = "none"
    """'sincos' adds a fixed 2-D sine-cosine embedding of each token's row and column (as DiT and
    BAGEL do for latent patches); 'none' leaves position to the 1-D RoPE of the sequence alone."""
    buckets: str = ""
    """Aspect-ratio buckets: pixel sizes ``HxW`` separated by commas (``"256x256,224x288,288x224"``), each
    divisible by vae_downsample x patch_size, at about the token count of ``image_size``
    (``megafusion/config/buckets.py``; ``tools/precompute_latents.py --resize bucket`` fits each image to
    the nearest). '' = square ``image_size`` images only. The loader packs images of any listed shape."""
    vae: str = ""
    """Local diffusers AutoencoderKL directory the latents come from. When set, latent_channels and
    vae_downsample are read from its config.json; a config that sets either to another value is an error."""

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_downsample

    @property
    def tokens_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.tokens_per_side**2


@dataclass
class ModelConfig:
    """Dimensions of the base Llama and the image side added to it."""

    vocab_size: int = 128256
    """Tokenizer vocabulary (unpadded). Llama-3: 128256."""
    hidden_size: int = 4096
    """Residual stream width."""
    num_layers: int = 32
    """Transformer layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_kv_heads: int = 8
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int = 14336
    """SwiGLU intermediate width."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling."""
    max_position_embeddings: int = 131072
    """Longest position the model is meant for."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix (small Llamas); both stay frozen either way."""
    boi_token_id: int = 128002
    """<BOI>: Llama-3 <|reserved_special_token_0|>."""
    eoi_token_id: int = 128003
    """<EOI>: Llama-3 <|reserved_special_token_1|>."""
    make_vocab_size_divisible_by: int = 128
    """Vocab is padded to a multiple of this times TP; padded logits are masked out."""
    attention_backend: str = "auto"
    """'auto' (FlexAttention on CUDA, SDPA on CPU), 'sdpa' or 'flex'."""
    init_std: float = 0.02
    """Std of random init for weights not loaded from a checkpoint."""
    architecture: str = "llamafusion"
    """'llamafusion' (the recipe: frozen text tower + trainable image tower) or 'transfusion' (the paper's
    baseline: image tokens go through the text tower's weights, and every weight trains; same FLOPs per token)."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image input/output modules."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """The TP x PP x DP layout."""

    tensor_parallel: int = 1
    """Tensor-parallel size (megatron-core TP group)."""
    pipeline_parallel: int = 1
    """Pipeline stages."""
    virtual_pipeline_stages: int | None = None
    """Interleaved model chunks per pipeline rank (None = plain 1F1B)."""
    data_parallel: int = -1
    """Data-parallel size; -1 = world_size / (TP x PP)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards norms/dropout activations along the sequence)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage over the trainable parameters (1 any layout; 2 only with PP=1)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in backward."""
    zero_bucket_elements: int = 50_000_000
    """Elements per ZeRO gradient-reduce / parameter-allgather bucket (capped at the trainable count).
    DeepSpeed's default, 5e8, allocates a 1 GB (bf16) bucket on every GPU whatever the model size."""
    params_dtype: str = "auto"
    """Parameter (and activation) dtype: 'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16' or 'fp32'
    ('bfloat16' / 'float32' are accepted). Under bf16, gradients accumulate and reduce in fp32."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda' or 'cpu'. A CUDA rank uses device 0 when its task sees one GPU,
    else device LOCAL_RANK (which must exist)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on the CPU), 'nccl' or 'gloo'."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (or the rendezvous) may wait for the other ranks before this rank fails
    (torch.distributed's process-group timeout). A lost node otherwise hangs every surviving rank this
    long before the job ends and can be requeued; lower it where steps and checkpoint saves are short."""


@dataclass
class DataConfig:
    """What the trainer reads."""

    path: str = ""
    """Latent-shard directory or pattern ('' = synthetic batches)."""
    tokenizer: str = ""
    """Local HF tokenizer directory."""
    seq_length: int = 4096
    """Packed sequence length."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    caption_first_prob: float = 0.8
    """Probability an image-caption pair is laid out caption-first."""
    num_workers: int = 2
    """DataLoader workers per rank (the batch order depends on it: a resume with another value warns and deals
    the rest of the epoch over the new workers)."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (a resume re-decodes up to this many samples per worker)."""
    text_path: str = ""
    """Optional text-only webdataset shards (a ``.txt`` member per sample) mixed into the sequences."""
    text_ratio: float = 0.0
    """Share of packed documents that are text-only (from ``text_path``)."""
    edit_instruction_loss: bool = False
    """Editing triples (``<s> <BOI> source <EOI> instruction <BOI> target <EOI> </s>``) take LM loss on their
    text; off, only the target image's diffusion loss trains on them."""
    vlm_understanding: bool = False
    """LLaVA-Fusion (``checkpoint.hf_llama`` a LLaVA): an image-first pair whose sample holds its picture
    (``KEY.pixels.npy``, ``tools/precompute_latents.py --keep-pixels``) is laid out the VLM's way,
    ``<s> <image>... caption </s>``, its picture read by the frozen vision tower. Such pairs train
    nothing (the understanding path is frozen; their LM loss is the VLM's caption loss); off, every
    pair goes through the image tower as latents, as from a text-only Llama."""


@dataclass
class OptimConfig:
    """AdamW and the LR schedule (paper defaults)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 1.5e-5
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 4000
    """Linear warmup steps."""
    train_steps: int = 100000
    """Total optimizer steps."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not on norms, biases, embeddings)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    max_consecutive_nonfinite: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row stop the run."""


@dataclass
class DiffusionConfig:
    """The image objective."""

    num_timesteps: int = 1000
    """DDPM steps."""
    schedule: str = "cosine"
    """Noise schedule ('cosine')."""
    prediction: str = "epsilon"
    """Target of the U-Net up-sampler: 'epsilon' (Transfusion) or 'v' (velocity)."""
    loss_weight: float = 5.0
    """lambda in loss = lm + lambda * diffusion MSE (Transfusion: 5)."""
    caption_dropout: float = 0.1
    """Share of captions dropped for classifier-free guidance."""
    understanding_max_timestep: int = 500
    """Images whose caption follows them (image-first pairs) are noised with t < this, not t < num_timesteps:
    a caption cannot be learned from an image that noise has erased (Transfusion limits the noise of its
    captioning examples to t < 500 as well). num_timesteps turns the cap off."""
    edit_source_dropout: float = 0.05
    """Share of editing triples whose source image is dropped (the instruction alone conditions the target),
    for image guidance when editing (InstructPix2Pix, BAGEL); the instruction is dropped at ``caption_dropout``."""


@dataclass
class CheckpointConfig:
    """Where weights come from and go."""

    hf_llama: str = ""
    """HF Llama directory (safetensors) to initialise the text tower from ('' = build a tiny random one,
    tiny preset only)."""
    load: str = ""
    """megafusion checkpoint to start from when ``save`` has no ``latest`` yet ('' = none)."""
    load_weights_only: bool = False
    """Fine-tuning (Megatron-LM's ``--finetune``): take only the trainable weights of ``load``; the step,
    the optimizer, the LR schedule and the data stream start anew. A preempted fine-tune still resumes
    fully from its own ``save`` directory."""
    save: str = ""
    """Directory for checkpoints ('' = run_dir/checkpoints); a run resumes from its ``latest``."""
    interval: int = 1000
    """Save every N steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 2
    """Completed checkpoints kept (older ones are deleted after a newer one is complete)."""
    async_save: bool = True
    """Write checkpoints in a background thread: the loop waits only for a host copy of the trainable
    weights and optimizer state; ``latest`` moves when every rank's files are complete."""


@dataclass
class LoggingConfig:
    """Run folder and logs."""

    run_dir: str = "runs/default"
    """Folder of this run (resolved config, logs, checkpoints)."""
    log_interval: int = 1
    """Steps between log lines."""
    tensorboard: bool = True
    """Write TensorBoard scalars to run_dir/tb."""
    all_ranks: bool = False
    """Print every rank's Python warnings and library log lines (default: rank 0's only)."""
    peak_tflops: float = 0.0
    """Peak device TFLOP/s for MFU (0 = known GPU table, or a measured matmul on CPU)."""


@dataclass
class Config:
    """Root of the tree; a preset YAML mirrors this layout."""

    name: str = "default"
    """Human-readable run/preset name."""
    seed: int = 1234
    """Seed of every random generator (same on all TP ranks for replicated modules)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
