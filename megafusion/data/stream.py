"""The trainer's view of data: an indexable stream of (micro-batch, noise) per data-parallel rank.

Position in the stream is (step, micro-batch index); the stream is a pure
function of that position, the seed and the DP rank, so a resumed run reads
exactly the batches an uninterrupted run would have read, and every pipeline
stage of one DP replica sees the same batch (first stage: inputs; last stage:
labels and noise targets).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megafusion.config.schema import Config
from megafusion.data.synthetic import synthetic_batch
from megafusion.diffusion.objective import noised, sample_timesteps
from megafusion.diffusion.schedule import CosineSchedule
from megafusion.model.batch import FusionBatch


def item_seed(cfg: Config, step: int, index: int) -> int:
    """Seed of the randomness of micro-batch ``index`` of ``step``, counted over the whole global batch.

    ``index = dp_rank * micro_batches_per_step + micro``: the global batch of a step is
    the same set of micro-batches at every DP size, so a run resumed at another DP
    size (a resharded checkpoint) sees the batches an unresharded run would have.
    """
    return ((cfg.seed * 1_000_003 + step) * 4099 + index) * 131


@dataclass
class TrainItem:
    batch: FusionBatch  # latents are noised: x_t
    noise: torch.Tensor  # [n_img, C, H, W] the diffusion target: epsilon, or v (diffusion.prediction)


def noised_item(
    clean: FusionBatch,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: CosineSchedule,
    cfg: Config,
    device: torch.device,
) -> TrainItem:
    """A clean micro-batch, its noise and timesteps -> what the stages consume (x_t in the batch, the target beside)."""
    noisy, target = noised(schedule, clean.latents, noise, t, cfg.diffusion.prediction)
    return TrainItem(replace(clean, latents=noisy, timesteps=t).to(device), target.to(device))


class SyntheticStream:
    """Synthetic packed batches of the training form, for runs without ``data.path`` (smoke runs, tests)."""

    def __init__(self, cfg: Config, dp_rank: int, device: torch.device, micro_per_step: int):
        self.cfg, self.dp_rank, self.device = cfg, dp_rank, device
        self.micro_per_step = micro_per_step
        self.schedule = CosineSchedule(cfg.diffusion.num_timesteps)
        self.caption_len = (4, 12)  # [min, max) caption tokens of a synthetic document

    def item(self, step: int, micro: int) -> TrainItem:
        seed = item_seed(self.cfg, step, self.dp_rank * self.micro_per_step + micro)
        clean = synthetic_batch(self.cfg, seed=seed, caption_len=self.caption_len)
        g = torch.Generator().manual_seed(seed + 17)
        noise = torch.randn(clean.latents.shape, generator=g)
        return noised_item(clean, noise, clean.timesteps, self.schedule, self.cfg, self.device)


class LoaderStream:
    """Packed micro-batches from latent shards (``data.path``), noised like :class:`SyntheticStream`.

    Position = micro-batches this DP rank has consumed; ``item(step, micro)`` reads
    position ``step * micro_batches_per_step + micro``. Jumping elsewhere (a resume)
    restarts the loader at that position: it skips exactly the consumed batches.
    """

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, device: torch.device, micro_per_step: int):
        self.cfg, self.dp_rank, self.dp_size, self.device = cfg, dp_rank, dp_size, device
        self.micro_per_step = micro_per_step
        self.schedule = CosineSchedule(cfg.diffusion.num_timesteps)
        self.position = 0
        self._it = None

    def item(self, step: int, micro: int) -> TrainItem:
        from megafusion.data.loader import make_loader

        want = step * self.micro_per_step + micro
        if want != self.position or self._it is None:
            self.position = want
            self._it = iter(make_loader(self.cfg, self.dp_rank, self.dp_size, start_batch=want))
        clean = next(self._it)
        self.position += 1
        g = torch.Generator().manual_seed(item_seed(self.cfg, step, self.dp_rank * self.micro_per_step + micro))
        n = clean.num_images
        if n == 0:
            return TrainItem(clean.to(self.device), torch.zeros(0))
        t = sample_timesteps(self.cfg.diffusion, n, g, clean.caption_after)
        noise = torch.randn(clean.latents.shape, generator=g)
        return noised_item(clean, noise, t, self.schedule, self.cfg, self.device)
