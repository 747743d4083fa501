"""DDIM / DDPM sampling steps on the cosine schedule the model trains with (epsilon or v prediction).

One update rule covers both (Song et al. 2021, eq. 12): with a_t = alpha_bar(t) and
a_p = alpha_bar of the next (smaller) timestep,

    x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)
    x_p   = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z

eta = 0 is DDIM (deterministic), eta = 1 is DDPM's ancestral sampling on the
chosen sub-sequence of timesteps.
"""

from __future__ import annotations

import torch

from megafusion.diffusion.schedule import CosineSchedule

SAMPLERS = {"ddim": 0.0, "ddpm": 1.0}


def timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """num_steps timesteps from T-1 down to 0, evenly spaced (rounded), without repeats."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {num_train_timesteps}]")
    ts = torch.linspace(num_train_timesteps - 1, 0, num_steps).round().long().tolist()
    return list(dict.fromkeys(ts))


def eta_of(sampler: str, eta: float | None) -> float:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler] if eta is None else float(eta)


def per_image_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise [n, ...] drawn image by image: image i's noise does not depend on how many follow it."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=generator) for _ in range(shape[0])])


EPSILON_CLIP_X0 = 4.0


def default_clip_x0(prediction: str) -> float | None:
    """The x0 clamp of ``step`` when none is given.

    epsilon: 4. At the first steps of the cosine schedule sqrt(alpha_bar) is ~5e-5, so x0
    from an imperfect eps is amplified ~20000x (diffusers' ``clip_sample``).
    v: none. x0 = sqrt(a) x_t - sqrt(1 - a) v is as bounded as the prediction, and a clamp only
    distorts: latents scaled to unit std still reach +-9 where colours saturate, and clamping
    the demo's at 4 turned every red shape yellow and every green one blue.
    """
    return EPSILON_CLIP_X0 if prediction == "epsilon" else None


def step(
    schedule: CosineSchedule,
    x: torch.Tensor,
    pred: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    generator: torch.Generator | None = None,
    clip_x0: float | None | str = "auto",
    prediction: str = "epsilon",
) -> torch.Tensor:
    """One update from timestep ``t`` to ``t_prev`` (-1 = the clean sample); ``pred`` is eps or v.

    ``clip_x0`` clamps the predicted clean latent to [-clip_x0, clip_x0]; 'auto' is
    :func:`default_clip_x0` of ``prediction``, None no clamp.
    """
    if clip_x0 == "auto":
        clip_x0 = default_clip_x0(prediction)
    ac = schedule.alphas_cumprod
    a_t = float(ac[t])
    a_p = float(ac[t_prev]) if t_prev >= 0 else 1.0
    if prediction == "v":  # v = sqrt(a) eps - sqrt(1-a) x0
        x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * pred
        eps = (1 - a_t) ** 0.5 * x + a_t**0.5 * pred
    elif prediction == "epsilon":
        eps = pred
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    else:
        raise ValueError(f"prediction={prediction!r} must be 'epsilon' or 'v'")
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    sigma = eta * ((1 - a_p) / (1 - a_t)) ** 0.5 * (1 - a_t / a_p) ** 0.5 if t_prev >= 0 else 0.0
    out = a_p**0.5 * x0 + max(1 - a_p - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        z = per_image_noise(x.shape, generator).to(device=x.device, dtype=x.dtype)
        out = out + sigma * z
    return out
