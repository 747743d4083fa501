"""The frozen understanding path of a LLaVA: a CLIP vision encoder and the multimodal projector.

LLaVA-Fusion (arXiv 2412.15188, section 5) starts from a vision-language model instead of a
text-only Llama. Its understanding path stays exactly the VLM's: pixels go through the CLIP
vision tower, the hidden states of ``vision_feature_layer`` (CLS dropped under the 'default'
strategy) through the projector, and the projected features take the place of the ``<image>``
placeholder tokens in the text embedding stream, which the frozen text tower then reads
causally like any text. Generation images are a separate, third kind of position (latents
between <BOI>/<EOI>, the trainable image tower), so nothing here ever trains.

The math follows ``transformers``' CLIPVisionTransformer and LlavaMultiModalProjector (weights
load by the same names), and it is checked against them in tests/unit/test_llava_fusion.py. Every
tensor-parallel rank holds a full copy (the tower is small next to the language model and runs a
forward only), so it needs no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class VisionSpec:
    """A LLaVA's vision tower and projector, as its ``config.json`` describes them (read, never set by hand)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    text_hidden_size: int
    projector_act: str
    projector_bias: bool
    feature_layers: tuple[int, ...]
    """hidden-state indices whose features are concatenated (0 = the embeddings after pre_layrnorm)."""
    keep_cls: bool
    """'full' strategy: the CLS position is kept; 'default' drops it."""
    image_token_id: int

    @property
    def tokens_per_image(self) -> int:
        """How many ``<image>`` placeholders one picture fills in the sequence."""
        return (self.image_size // self.patch_size) ** 2 + int(self.keep_cls)

    @property
    def layers_needed(self) -> int:
        """Encoder layers to run: up to the deepest selected hidden state (later ones do not reach the output)."""
        return max(i % (self.num_layers + 1) for i in self.feature_layers)


class _Attention(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.heads = s.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(s.hidden_size, s.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, d], no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(b, n, h))


class _MLP(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(s.hidden_size, s.intermediate_size)
        self.fc2 = nn.Linear(s.intermediate_size, s.hidden_size)
        self.act = ACTIVATIONS[s.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.self_attn = _Attention(s)
        self.layer_norm2 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.mlp = _MLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        n_pos = (s.image_size // s.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(s.hidden_size))
        self.patch_embedding = nn.Conv2d(s.num_channels, s.hidden_size, s.patch_size, s.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n_pos, s.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [n, C, gh, gw] -> [n, gh*gw, h]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight.to(patches.dtype)  # [n, 1+P, h]


class _Encoder(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(s) for _ in range(s.layers_needed))


class _Projector(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        width = s.hidden_size * len(s.feature_layers)
        self.linear_1 = nn.Linear(width, s.text_hidden_size, bias=s.projector_bias)
        self.linear_2 = nn.Linear(s.text_hidden_size, s.text_hidden_size, bias=s.projector_bias)
        self.act = ACTIVATIONS[s.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionPath(nn.Module):
    """Pixels [n, 3, H, W] -> projected features [n, tokens_per_image, text hidden], all frozen.

    Submodule names are the HF ones (``tower.embeddings...``, ``tower.encoder.layers.N...``,
    ``projector.linear_1``) so the importer maps names one to one. Only the encoder layers up to the
    deepest selected hidden state are built (LLaVA-1.5: 23 of 24) and no ``post_layernorm``: LLaVA reads
    hidden states, which transformers returns before that norm, so neither can change the output.
    """

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.tower = nn.Module()
        self.tower.embeddings = _Embeddings(spec)
        self.tower.pre_layrnorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.tower.encoder = _Encoder(spec)
        self.projector = _Projector(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s.num_channels, s.image_size, s.image_size):
            raise ValueError(
                f"pixel_values must be [n, {s.num_channels}, {s.image_size}, {s.image_size}] (the LLaVA's "
                f"vision_config.image_size), got shape {tuple(pixels.shape)}"
            )
        dtype = self.projector.linear_1.weight.dtype
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixels.to(dtype)))  # hidden state 0
        states = [x]
        for layer in self.tower.encoder.layers:
            x = layer(x)
            states.append(x)
        picked = [states[i % (s.num_layers + 1)] for i in s.feature_layers]
        if not s.keep_cls:
            picked = [h[:, 1:] for h in picked]
        return self.projector(torch.cat(picked, -1))  # [n, tokens_per_image, text hidden]


__all__ = ["VisionPath", "VisionSpec"]
