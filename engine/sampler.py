"""DPM-Solver++ sampling with classifier-free guidance, as stateless functions.

The solver state is just x and the previous steps' x0 (one for 2M, two for 3M); each step
takes one step's tensors plus host scalars from `glyph_engine.schedule`, so a fused kernel
can replace `dpmpp_step` and be checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from glyph_engine.schedule import StepCoefficients

# predict(x, timestep) -> (eps_cond, eps_uncond); eps_uncond is None when guidance is off.
Predictor = Callable[[Tensor, int], tuple[Tensor, Tensor | None]]
StepFn = Callable[..., tuple[Tensor, Tensor]]


def dpmpp_step(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    history: Sequence[Tensor],
    coef: StepCoefficients,
    guidance: float,
    clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++ step: guidance combine, x0 prediction, optional x0 clamp, update.

    `history` holds the previous steps' x0, newest first (at least `len(coef.prev)` of them).
    Returns ``(x_next, x0)``; math in x's dtype, the noise predictions are cast to it.
    """
    eps = eps_cond.to(x.dtype)
    if eps_uncond is not None:
        eps_uncond = eps_uncond.to(x.dtype)
        eps = eps_uncond + guidance * (eps - eps_uncond)
    x0 = coef.x_scale * x - coef.eps_scale * eps
    if clamp is not None:
        x0 = x0.clamp(*clamp)
    x_next = coef.a * x + coef.b * x0
    if len(history) < len(coef.prev):
        raise ValueError(f"an order-{len(coef.prev) + 1} step needs the previous {len(coef.prev)} steps' x0")
    for weight, x0_before in zip(coef.prev, history, strict=False):
        x_next = x_next + weight * x0_before
    return x_next, x0


def sample_dpmpp(
    predict: Predictor,
    x: Tensor,
    coefficients: Sequence[StepCoefficients],
    guidance: float = 1.0,
    clamp: tuple[float, float] | None = None,
    step: StepFn = dpmpp_step,
    callback: Callable[[int], None] | None = None,
) -> Tensor:
    """Samples with multistep DPM-Solver++ from noise `x` along precomputed coefficients."""
    depth = max(len(coef.prev) for coef in coefficients)  # how many previous x0 any step uses
    history: tuple[Tensor, ...] = ()
    for i, coef in enumerate(coefficients):
        eps_cond, eps_uncond = predict(x, coef.timestep)
        x, x0 = step(x, eps_cond, eps_uncond, history, coef, guidance, clamp)
        history = (x0, *history)[:depth]
        if callback is not None:
            callback(i)
    return x


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise, one independent CPU generator per sample.

    Each image's noise depends only on its own seed, so the same seeds give the same images
    whatever the batch size or device.
    """
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return out


def centred(noise: Tensor) -> Tensor:
    """Each image's noise less its own mean (`GenerationSettings.center_noise`)."""
    return noise - noise.mean(dim=tuple(range(1, noise.dim())), keepdim=True)
