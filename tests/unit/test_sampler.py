"""DDIM/DDPM updates against an oracle that knows the clean sample: both targets land on it."""

import pytest
import torch

from megafusion.diffusion.schedule import CosineSchedule
from megafusion.inference.sampler import step, timesteps


def _oracle_run(prediction, eta, x0, clip_x0="auto"):
    sch = CosineSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x0.shape, generator=g)
    ts = timesteps(1000, 20)
    for i, t in enumerate(ts):
        a = sch.alphas_cumprod[t].double()
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that explains x given x0
        target = sch.target(x0.double(), eps, torch.full((x0.shape[0],), t), prediction).float()
        x = step(
            sch, x, target, t, ts[i + 1] if i + 1 < len(ts) else -1, eta, g, clip_x0=clip_x0, prediction=prediction
        )
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_prediction_recovers_the_clean_sample(prediction, eta):
    x0 = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.testing.assert_close(_oracle_run(prediction, eta, x0), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_large_latents_survive_v_sampling_and_the_epsilon_clamp_is_explicit(eta):
    """Unit-std latents reach +-9 at saturated colours: v sampling must not clamp them (by default)."""
    x0 = (torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1) * 9
    torch.testing.assert_close(_oracle_run("v", eta, x0), x0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(_oracle_run("epsilon", eta, x0, clip_x0=None), x0, atol=1e-3, rtol=1e-4)
    assert _oracle_run("epsilon", eta, x0).abs().max() <= 4.0 + 1e-5  # the epsilon default clamps at 4
    assert _oracle_run("v", eta, x0, clip_x0=4.0).abs().max() <= 4.0 + 1e-5


def test_v_target_inverts_to_x0_and_eps():
    sch = CosineSchedule(1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    xt = sch.add_noise(x0, eps, t)
    v = sch.target(x0, eps, t, "v")
    a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * xt + a.sqrt() * v, eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be 'epsilon' or 'v'"):
        sch.target(x0, eps, t, "x0")
