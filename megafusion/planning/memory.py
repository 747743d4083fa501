"""Per-GPU memory and per-step FLOPs of a LlamaFusion training layout, and which layouts fit a GPU.

What is exact and what is modelled:
  * parameters, gradients, ZeRO-partitioned fp32 master weights and Adam moments, and the
    ZeRO reduce bucket are counted from the model's shapes (the U-Nets by building them on
    the meta device) and DeepSpeed's ZeRO-1/2 layout, per pipeline stage;
  * transformer-layer activations are a per-token model of this implementation's saved
    tensors, ``elements/token = 11.61 h + 11.61 q + 6.24 f + 5.41 kv - 2154`` (q, kv, f are a
    rank's local widths; h is divided by TP only under sequence parallelism). The coefficients
    were fitted to tensors measured by ``TensorMemoryTracker`` on real layers of this code
    (12 shapes, within 11%); they scale with the parameter dtype;
  * U-Net activations are measured by running the configured U-Nets (on 1 and 3 images);
  * pipeline schedules keep ``min(micro-batches, pp)`` micro-batches in flight on the first
    stage (1F1B), or megatron-core's interleaved warm-up count of model chunks; activation
    checkpointing keeps each layer's input plus one layer being recomputed;
  * a LLaVA's frozen vision tower + projector (LLaVA-Fusion, ``vision=``: the ``VisionSpec`` of the
    LLaVA directory, ``checkpoint.hf_import.vision_spec_from_hf``) is counted exactly by
    :func:`vision_params`, in the parameter dtype, whole on every TP rank of the first pipeline stage,
    with no gradients or optimizer state. It runs a forward with nothing requiring grad, so it keeps no
    activations for backward; its transient forward buffers are not counted.
The peak is the static part and the ZeRO bucket plus activations and gradients (added when a
step has several micro-batches, since the first backward's gradients stay; otherwise the larger,
as backward frees activations while it makes gradients), or the optimizer step's needs. ``tests/unit/test_planner.py``
checks the tiny preset's figure against the peak tensor memory of real CPU training runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megafusion.config.schema import Config
from megafusion.config.validate import config_problems
from megafusion.model.vision_tower import VisionSpec
from megafusion.parallel.layout import Layout, with_layout
from megafusion.parallel.megatron_config import padded_vocab_size
from megafusion.training.flops import image_io_flops_per_image, planned_attention_pairs, transformer_flops_per_step

GIB = 2**30
LAYER_COEF = {"const": -2154.0, "h": 11.61, "q": 11.61, "f": 6.238, "kv": 5.409}


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: str
    frozen_weights: float
    trainable_weights: float
    gradients: float
    optimizer: float  # fp32 master + Adam moments (ZeRO-partitioned)
    bucket: float
    activations: float
    step_transient: float  # fp32 gradient partition during the optimizer step (bf16 runs)

    grads_during_forward: bool = True  # more than one micro-batch per step: grads of the first stay

    @property
    def peak(self) -> float:
        """Static memory + bucket + what forward/backward and the optimizer step need on top.

        With several micro-batches per step the gradients made by the first backward live
        on while later micro-batches keep activations, so both add up. With one micro-batch,
        backward frees activations layer by layer as it makes gradients, so the larger of
        the two counts. The step needs all gradients and, in bf16, their fp32 (and averaged
        bf16) partitions.
        """
        static = self.frozen_weights + self.trainable_weights + self.optimizer
        fwd_bwd = (
            self.activations + self.gradients if self.grads_during_forward else max(self.activations, self.gradients)
        )
        return static + self.bucket + max(fwd_bwd, self.gradients + self.step_transient)


def vision_params(spec: VisionSpec) -> int:
    """Parameters of a LLaVA's vision path as ``model.vision_tower.VisionPath`` builds it (exact).

    Embeddings (class [h], patch conv [h, C, p, p] without bias, positions [(image/p)^2 + 1, h]),
    pre_layrnorm, the ``layers_needed`` encoder layers (q/k/v/out h x h with bias, two LayerNorms,
    fc1 h -> intermediate and fc2 back, with bias) and the projector (h x len(feature_layers) -> text
    hidden -> text hidden, biases if ``projector_bias``); no post_layernorm, no layer LLaVA never reads.
    """
    h, inter, p, t = spec.hidden_size, spec.intermediate_size, spec.patch_size, spec.text_hidden_size
    embeddings = h + h * spec.num_channels * p * p + ((spec.image_size // p) ** 2 + 1) * h
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * inter + inter) + (inter * h + h)
    bias = int(spec.projector_bias)
    projector = h * len(spec.feature_layers) * t + bias * t + t * t + bias * t
    return embeddings + 2 * h + spec.layers_needed * layer + projector


def _unet_params(cfg: Config) -> tuple[int, int]:
    from megafusion.model.image_io import build_image_in, build_image_out

    m = cfg.model
    with torch.device("meta"):
        a = build_image_in(m.image, m.hidden_size)
        b = build_image_out(m.image, m.hidden_size, m.rms_norm_eps)
    return sum(x.numel() for x in a.parameters()), sum(x.numel() for x in b.parameters())


_UNET_ACT: dict[tuple, tuple[float, float]] = {}


def unet_activation_bytes_fp32(cfg: Config, images: float) -> float:
    """Tensors the U-Nets keep for backward for ``images`` images (fp32), measured on real forwards.

    Measured at 1 and 3 images: a fixed part (per call) plus a part per image.
    """
    from megafusion.model.image_io import build_image_in, build_image_out
    from megafusion.planning.tensor_memory import TensorMemoryTracker

    m, img = cfg.model, cfg.model.image
    key = (repr(img), m.hidden_size)
    if key not in _UNET_ACT:
        with torch.random.fork_rng(devices=[]):
            enc, dec = build_image_in(img, m.hidden_size), build_image_out(img, m.hidden_size, m.rms_norm_eps)
        kept = []
        for n in (1, 3):
            lat = torch.zeros(n, img.latent_channels, img.latent_size, img.latent_size)
            t = torch.zeros(n, dtype=torch.long)
            tracker = TensorMemoryTracker()
            with tracker:
                start = tracker.current
                tokens, skips = enc(lat, t)
                pred = dec(tokens.detach().requires_grad_(True), t, skips)
                kept.append(float(tracker.current - start))  # with pred, tokens, skips still alive
            del pred, tokens, skips
        per_image = (kept[1] - kept[0]) / 2
        _UNET_ACT[key] = (kept[0] - per_image, per_image)
    fixed, per_image = _UNET_ACT[key]
    return fixed + per_image * images if images > 0 else 0.0


def layer_activation_elements(cfg: Config, lay: Layout, tokens: int) -> float:
    """Elements one transformer layer keeps for backward for ``tokens`` tokens of one micro-batch."""
    m = cfg.model
    c = LAYER_COEF
    h_local = m.hidden_size / (lay.tp if lay.sequence_parallel else 1)
    q = m.num_attention_heads * m.head_dim / lay.tp
    kv = m.num_kv_heads * m.head_dim / lay.tp
    f = m.ffn_hidden_size / lay.tp
    per_token = c["const"] + c["h"] * h_local + c["q"] * q + c["f"] * f + c["kv"] * kv
    return tokens * max(per_token, 2.0 * h_local)


def in_flight(lay: Layout, num_micro: int, rank: int = 0) -> int:
    """Model chunks (x micro-batches) whose activations pipeline rank ``rank`` holds at once.

    megatron-core's warm-up counts: 1F1B ``pp - rank - 1`` forwards before the first
    backward, interleaved ``(pp - rank - 1) * 2 + (vpp - 1) * pp``; plus the one in steady state.
    """
    if lay.pp == 1:
        return 1
    if lay.vpp == 1:
        return min(num_micro, lay.pp - rank)
    warmup = (lay.pp - rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return min(num_micro * lay.vpp, warmup + 1)


def stage_memory(
    cfg: Config,
    lay: Layout,
    dtype_bytes: int = 2,
    image_fraction: float = 0.5,
    vision: VisionSpec | None = None,
) -> list[StageMemory]:
    """Memory of the first, (a middle,) and last pipeline stage under ``lay``.

    ``vision``: the model starts from a LLaVA (LLaVA-Fusion) with this vision path; its weights are
    added to the first stage's frozen weights (every TP rank holds all of them).
    """
    m = cfg.model
    if m.architecture != "llamafusion":
        raise ValueError(
            f"model.architecture={m.architecture!r}: the planner models the recipe (frozen text tower "
            "+ trainable image tower) only"
        )
    t, pp = lay.tp, lay.pp
    h, d = m.hidden_size, m.head_dim
    vpad = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, t)
    tower = (
        h * (m.num_attention_heads + 2 * m.num_kv_heads) * d + m.num_attention_heads * d * h + 3 * h * m.ffn_hidden_size
    ) / t + 2 * h  # one tower of one layer on one TP rank
    layers = m.num_layers / pp
    unet_in, unet_out = _unet_params(cfg)
    s, mb = cfg.data.seq_length, lay.micro_batch_size
    num_micro = max(1, cfg.data.global_batch_size // (mb * lay.dp))
    tokens = s * mb
    images = tokens * image_fraction / m.image.tokens_per_image
    scale = dtype_bytes / 4  # activations were measured in fp32
    per_layer = layer_activation_elements(cfg, lay, tokens) * 4 * scale
    h_local = h / (t if lay.sequence_parallel else 1)
    layers_per_chunk = m.num_layers / (pp * lay.vpp)
    unet_act = unet_activation_bytes_fp32(cfg, images) * scale
    kinds = ["first", "last"] if pp > 1 else ["only"]
    if pp > 2:
        kinds.insert(1, "middle")
    out = []
    for kind in kinds:
        first, last = kind in ("first", "only"), kind in ("last", "only")
        rank = {"first": 0, "only": 0, "middle": pp // 2, "last": pp - 1}[kind]
        chunks = in_flight(lay, num_micro, rank)
        micro_in_flight = max(1, math.ceil(chunks / lay.vpp))
        if lay.activation_checkpointing:  # each layer's input, plus the one layer being recomputed
            act = chunks * layers_per_chunk * tokens * h_local * dtype_bytes + per_layer
        else:
            act = chunks * layers_per_chunk * per_layer
        act += micro_in_flight * tokens * h_local * dtype_bytes  # the stage's input/output hidden states
        if first or last:
            act += micro_in_flight * unet_act
        if last:
            act += tokens * (1 - image_fraction) * (vpad / t) * 4 * 2  # fp32 logits of text tokens + their grad
        frozen = layers * tower + (vpad * h / t if first else 0) + ((vpad * h / t + h) if last else 0)
        if first and vision is not None:  # replicated on every TP rank, first stage only (model.vision)
            frozen += vision_params(vision)
        trainable = layers * tower + (2 * h + unet_in if first else 0) + (unet_out if last else 0)
        replica = unet_in if (last and not first and m.image.io == "unet") else 0
        # trainable gradients accumulate in fp32 whatever the weights' dtype (training/engine.py); the replica,
        # outside the optimizer, keeps a plain .grad
        grads = trainable * 4 / (lay.dp if lay.zero_stage == 2 else 1) + replica * dtype_bytes
        out.append(
            StageMemory(
                stage=kind,
                frozen_weights=frozen * dtype_bytes,
                trainable_weights=(trainable + replica) * dtype_bytes,
                gradients=grads,
                optimizer=3 * 4 * trainable / lay.dp,
                # ZeRO-1 reduces the fp32 accumulation buffers; ZeRO-2's hook bucket holds bf16 grads
                bucket=min(cfg.parallel.zero_bucket_elements, trainable) * (4 if lay.zero_stage == 1 else dtype_bytes),
                activations=act,
                # the reduced fp32 gradient partition and its flat fp32 copy for the master step (bf16 runs)
                step_transient=8 * trainable / lay.dp if dtype_bytes != 4 else 0.0,
                grads_during_forward=num_micro > 1,
            )
        )
    return out


def step_flops(cfg: Config, image_fraction: float = 0.5) -> float:
    """Training FLOPs of one optimizer step (global batch, all ranks), as the trainer's MFU counts them."""
    seqs = cfg.data.global_batch_size
    tokens = seqs * cfg.data.seq_length
    image = int(tokens * image_fraction)
    images = image / cfg.model.image.tokens_per_image
    pairs = planned_attention_pairs(cfg, seqs, image_fraction)
    return transformer_flops_per_step(cfg, tokens - image, image, seqs, pairs) + images * image_io_flops_per_image(cfg)


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """TP x PP (x DP) layouts the model can be trained in on ``gpus`` GPUs (TP within a node).

    A layout is proposed only if ``config_problems`` accepts it (the rules every run is validated
    against), with ZeRO-2 where those rules allow it and ZeRO-1 otherwise; sequence parallelism is
    on whenever TP > 1.
    """
    m = cfg.model
    out = []
    for tp in (1, 2, 4, 8, 16):
        if tp > gpus_per_node:
            continue
        for pp in range(1, min(m.num_layers, 32) + 1):
            if gpus % (tp * pp):
                continue
            for ac in (False, True):
                for zero in (2, 1):  # stage 2 also partitions gradients: take it when it is valid
                    lay = Layout(tp, pp, gpus // (tp * pp), 1, tp > 1, ac, zero, cfg.data.micro_batch_size)
                    if not config_problems(with_layout(cfg, lay), world_size=gpus):
                        out.append(lay)
                        break
    return out


def fits(
    cfg: Config,
    lay: Layout,
    gpu_gib: float,
    dtype_bytes: int = 2,
    image_fraction: float = 0.5,
    headroom: float = 0.9,
    vision: VisionSpec | None = None,
) -> tuple[bool, float]:
    """(fits, peak GiB): the worst stage's peak against ``headroom`` x the GPU (allocator slack, NCCL buffers)."""
    peak = max(sm.peak for sm in stage_memory(cfg, lay, dtype_bytes, image_fraction, vision)) / GIB
    return peak <= gpu_gib * headroom, peak


def mfu(cfg: Config, step_seconds: float, gpus: int, peak_tflops: float, image_fraction: float = 0.5) -> float:
    return step_flops(cfg, image_fraction) / (step_seconds * gpus * peak_tflops * 1e12)


def human(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"


def checkpoint_bytes(cfg: Config, lay: Layout, dtype_bytes: int = 2) -> tuple[float, float]:
    """(bytes of one training checkpoint over all ranks, bytes the busiest rank writes).

    A checkpoint holds the trainable weights once per (TP, PP) shard (written by DP rank 0, in the
    parameter dtype, the last stage's tied U-Net replica included) and every rank's ZeRO partition
    (fp32 master + two Adam moments); the frozen text tower is not in it.
    """
    stages = stage_memory(cfg, lay, dtype_bytes)
    count = {"only": 1, "first": 1, "last": 1, "middle": max(0, lay.pp - 2)}
    total = sum(count[sm.stage] * lay.tp * (sm.trainable_weights + sm.optimizer * lay.dp) for sm in stages)
    busiest = max(sm.trainable_weights + sm.optimizer for sm in stages)
    return total, busiest
