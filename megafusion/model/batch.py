"""The packed multimodal micro-batch the model consumes (and the data loader produces)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megafusion.model.routing import RoutePlan


@dataclass
class FusionBatch:
    """One micro-batch of packed sequences.

    Image tokens are laid out contiguously in raster order, and images are
    numbered in order of appearance (row by row, then position), which is the
    order of ``latents``.
    """

    input_ids: torch.Tensor
    """[b, s] token ids; the value at image positions is ignored."""
    image_ids: torch.Tensor
    """[b, s] -1 for text tokens, else the index in ``latents`` of the image this token belongs to."""
    position_ids: torch.Tensor | None = None
    """[b, s] RoPE positions (restart at 0 in each packed document); default 0..s-1."""
    document_ids: torch.Tensor | None = None
    """[b, s] packed-document id; no attention across documents; default one document per row."""
    latents: torch.Tensor | None = None
    """[n_img, C, H, W] noisy VAE latents x_t (clean latents with t=0 for understanding)."""
    timesteps: torch.Tensor | None = None
    """[n_img] diffusion timestep of each image."""
    labels: torch.Tensor | None = None
    """[b, s] next-token target of each position (any value where loss_mask is 0)."""
    loss_mask: torch.Tensor | None = None
    """[b, s] 1.0 where the LM loss counts (text positions only; not on the token predicting <BOI>)."""
    sample_keys: list | None = None
    """Provenance of each image (source shard#key), in image order; not used by the model."""
    caption_after: torch.Tensor | None = None
    """[n_img] bool, True where the image's caption follows it (an understanding example); the
    trainer caps the noise of those images (``diffusion.understanding_max_timestep``). Not used by the model."""
    pixel_values: torch.Tensor | None = None
    """[n_vis, 3, H, W] pictures for a LLaVA's frozen vision tower (LLaVA-Fusion understanding): their
    features replace the ``<image>`` placeholder ids of ``input_ids`` in row-major order, image by image.
    Those positions are text positions (``image_ids`` -1). None without such pictures."""
    clean_images: torch.Tensor | None = None
    """[n_img] bool, True for an editing source: given clean (timestep 0, never noised) and taking no diffusion
    loss; only the target it conditions is learned. None: no such image (every image is noised and learned)."""
    route_plan: RoutePlan | None = None
    """The token routes of ``image_ids`` (``RoutePlan.build``), computed where the batch is packed so the
    model's forward reads no size back from the device; None: the model builds them itself (with syncs).
    It describes ``image_ids``: whoever changes those must drop it (``check`` verifies it)."""

    @staticmethod
    def text_only(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> FusionBatch:
        return FusionBatch(input_ids=input_ids, image_ids=torch.full_like(input_ids, -1), labels=labels)

    @property
    def num_images(self) -> int:
        return 0 if self.latents is None else int(self.latents.shape[0])

    def with_defaults(self) -> FusionBatch:
        b, s = self.input_ids.shape
        dev = self.input_ids.device
        pos = self.position_ids if self.position_ids is not None else torch.arange(s, device=dev).expand(b, s)
        doc = self.document_ids if self.document_ids is not None else torch.zeros(b, s, dtype=torch.long, device=dev)
        return replace(self, position_ids=pos, document_ids=doc)

    def to(self, device: torch.device | str) -> FusionBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        movable = (torch.Tensor, RoutePlan)  # the plan's index tensors travel with the batch
        return FusionBatch(**{k: (v.to(device) if isinstance(v, movable) else v) for k, v in kw.items()})

    def check(self, tokens_per_image: int, latent_shape: tuple[int, int, int]) -> None:
        """Raise ValueError naming the field at fault if the batch is inconsistent."""
        b, s = self.input_ids.shape
        for name in ("image_ids", "position_ids", "document_ids", "labels", "loss_mask"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"FusionBatch.{name} has shape {tuple(t.shape)}, expected {(b, s)} like input_ids")
        if self.route_plan is not None and not self.route_plan.same_as(
            RoutePlan.build(self.image_ids, len(self.route_plan.shards) or 1)
        ):
            raise ValueError(
                "FusionBatch.route_plan does not match image_ids (rebuild it, or drop it: route_plan=None)"
            )
        order = self.image_ids[self.image_ids >= 0]  # row-major order of appearance
        n_img = self.num_images
        if order.numel() == 0:
            if n_img:
                raise ValueError(f"FusionBatch.latents holds {n_img} images but image_ids marks no image token")
            return
        if self.latents is None or self.timesteps is None:
            raise ValueError("FusionBatch.image_ids marks image tokens but latents/timesteps are missing")
        if tuple(self.latents.shape[1:]) != tuple(latent_shape):
            raise ValueError(
                f"FusionBatch.latents has per-image shape {tuple(self.latents.shape[1:])}, "
                f"the model expects {tuple(latent_shape)} (model.image.latent_channels/image_size/vae_downsample)"
            )
        if tuple(self.timesteps.shape) != (n_img,):
            raise ValueError(f"FusionBatch.timesteps has shape {tuple(self.timesteps.shape)}, expected ({n_img},)")
        expected = torch.arange(n_img, device=order.device).repeat_interleave(tokens_per_image)
        if order.numel() != expected.numel() or not torch.equal(order, expected):
            raise ValueError(
                f"FusionBatch.image_ids must give each of the {n_img} images exactly {tokens_per_image} "
                f"tokens, images numbered 0..{n_img - 1} in order of appearance; got {order.numel()} image tokens"
            )
