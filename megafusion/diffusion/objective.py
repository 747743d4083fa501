"""The image side's training objective in one place: timesteps, noising, the target and the loss.

Every training path calls these (``data.stream`` for noising, ``training.stages`` for the loss):

* timesteps are uniform over ``diffusion.num_timesteps``, except that images whose caption
  follows them (captioning pairs, ``FusionBatch.caption_after``) draw from
  ``[0, diffusion.understanding_max_timestep)``: a caption can only be learned from an image
  that noise has not erased;
* x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps (the cosine schedule, ``schedule.py``), and the
  model regresses eps or v (``diffusion.prediction``);
* loss = lm_loss + ``diffusion.loss_weight`` x mse(prediction, target), the mse in fp32;
* editing sources (``FusionBatch.clean_images``) are given clean, at timestep 0, and take no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafusion.config.schema import DiffusionConfig
from megafusion.diffusion.schedule import CosineSchedule


def sample_timesteps(
    cfg: DiffusionConfig, n: int, generator: torch.Generator, caption_after: torch.Tensor | None = None
) -> torch.Tensor:
    """Timesteps [n] for n images; ``caption_after`` [n] bool marks captioning pairs (capped noise)."""
    t = torch.randint(0, cfg.num_timesteps, (n,), generator=generator)
    if cfg.understanding_max_timestep < cfg.num_timesteps and caption_after is not None:
        capped = torch.randint(0, cfg.understanding_max_timestep, (n,), generator=generator)
        t = torch.where(caption_after, capped, t)
    return t


def noised(
    schedule: CosineSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents x0 [n, C, H, W], noise and timesteps [n] -> (x_t the model sees, the target it predicts)."""
    return schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t, prediction)


def with_clean_sources(
    x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, clean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Editing sources (``clean`` [n] bool) back to their clean latents at timestep 0; others unchanged."""
    if clean is None:
        return x_t, t
    return torch.where(clean[:, None, None, None], x0, x_t), torch.where(clean, torch.zeros_like(t), t)


def diffusion_mse(
    pred: torch.Tensor | None, target: torch.Tensor, like: torch.Tensor, clean: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in fp32; a zero scalar (on ``like``'s device) when the micro-batch holds no image.

    An empty ``pred`` [0, ...] (the up-sampler run on no image, so that ZeRO-2 sees its gradients) gives a
    zero that keeps it in the graph. ``clean`` [n] bool: images that take no loss (editing sources); the mean
    runs over the others, without reading their number back to the host.
    """
    if pred is None:
        return like.new_zeros(())
    if pred.shape[0] == 0:
        return pred.float().sum() * 0.0
    if clean is None:
        return F.mse_loss(pred.float(), target.float())
    per_image = (pred.float() - target.float()).square().flatten(1).mean(1)  # [n]
    keep = (~clean.to(per_image.device)).float()
    return (per_image * keep).sum() / keep.sum().clamp(min=1.0)


def total_loss(lm_loss: torch.Tensor, diffusion_loss: torch.Tensor, loss_weight: float) -> torch.Tensor:
    """The recipe's loss: LM cross-entropy + ``loss_weight`` x diffusion mse (Transfusion: weight 5)."""
    return lm_loss + loss_weight * diffusion_loss
