"""Sampler test inputs shared by test modules (a helper, not a test module): the
glyffuser's training noise schedule and a stand-in noise predictor."""

import torch
from diffusers import DDPMScheduler

ALPHAS_CUMPROD = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.numpy()  # the glyffuser's training schedule


def toy_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a trained noise predictor.

    It predicts a clean image in [0, 1] (as the glyffuser does) and returns the matching
    epsilon, so sample magnitudes stay realistic and float32 rounding inside diffusers stays
    far below the tolerance.
    """
    abar = float(ALPHAS_CUMPROD[t])
    x0 = 0.5 + 0.5 * torch.tanh(x * (0.5 + t / 1000.0) + 0.2 * torch.sin(3 * x))
    return (x - abar**0.5 * x0) / (1 - abar) ** 0.5
