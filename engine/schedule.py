"""DPM-Solver++ (multistep, data prediction) per-step coefficients, computed once on the host.

Every scalar a sampling step needs depends only on the training noise schedule and the
number of steps, so it is computed here in float64 and the step on the device is a single
elementwise pass: ``x_next = a * x + b * x0 + sum(prev[k] * x0 of k + 1 steps back)`` with
``x0 = x_scale * x - eps_scale * eps``.

Timestep selection and sigma handling follow diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``), the glyffuser's sampler.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


class Spacing(str, enum.Enum):
    """How timesteps are picked from the training schedule (diffusers' `timestep_spacing`)."""

    linspace = "linspace"
    leading = "leading"
    trailing = "trailing"


FinalSigma = Literal["zero", "sigma_min"]


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler (`glyph_engine.samplers`) and how it walks the noise schedule. Defaults
    match the glyffuser's sampler."""

    name: str = "dpmpp-2m"  # a key of samplers.SAMPLERS
    # At most the sampler's own (None): 2 = DPM-Solver++(2M), 3 = (3M); 1 = DDIM-equivalent.
    order: int | None = None
    spacing: Spacing = Spacing.linspace  # how timesteps are picked from the training schedule
    karras_sigmas: bool = False  # rho=7 ramp; spends more steps at low noise
    lower_order_final: bool = True  # first-order last steps when fewer than 15: stabler
    final_sigma: FinalSigma = "zero"  # "zero" ends exactly on the predicted x0
    steps_offset: int = 0  # added to "leading" timesteps, as in the training scheduler config


@dataclass(frozen=True)
class StepCoefficients:
    """The host scalars of one solver step."""

    timestep: int  # what the U-Net is conditioned on
    x_scale: float  # 1 / alpha_s
    eps_scale: float  # sigma_s / alpha_s
    a: float  # weight of x (sigma_t_next / sigma_t_s)
    b: float  # weight of this step's x0
    prev: tuple[float, ...] = ()  # weights of the previous steps' x0, newest first (order - 1 of them)


def _timesteps(spacing: Spacing, num_steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    if num_steps == num_train:
        # The maximum: every training timestep once, whatever the spacing (diffusers' "trailing"
        # gives exactly this). Diffusers' "linspace" repeats a timestep here, a zero-length step
        # whose second-order update divides by zero, and "leading" puts every step at t = 0.
        return np.arange(num_train - 1, -1, -1, dtype=np.int64)
    if spacing == "linspace":
        t = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = num_train // (num_steps + 1)
        t = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(num_train, 0, -num_train / num_steps).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return t.astype(np.int64)


def _sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep whose sigma is `sigma` (log-linear interpolation)."""
    log_sigma = math.log(max(sigma, 1e-10))
    # log_sigmas increases with t; find the bracketing pair.
    low = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def timesteps_and_sigmas(
    alphas_cumprod: np.ndarray, num_steps: int, config: SamplerConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The model timesteps (length N) and sigmas (length N + 1, ending at the final sigma)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    train_sigmas = np.sqrt((1 - abar) / abar)
    if config.karras_sigmas:
        log_sigmas = np.log(train_sigmas)
        sigmas = _karras(train_sigmas[0], train_sigmas[-1], num_steps)
        timesteps = np.array([_sigma_to_timestep(s, log_sigmas) for s in sigmas]).round().astype(np.int64)
    else:
        timesteps = _timesteps(config.spacing, num_steps, len(abar), config.steps_offset)
        sigmas = np.interp(timesteps, np.arange(len(abar)), train_sigmas)
    final = 0.0 if config.final_sigma == "zero" else train_sigmas[0]
    return timesteps, np.append(sigmas, final)


def dpmpp_coefficients(
    alphas_cumprod: np.ndarray, num_steps: int, config: SamplerConfig = SamplerConfig(order=2)
) -> list[StepCoefficients]:
    """Per-step scalars of multistep DPM-Solver++ of order `config.order`: 1, 2 (2M, midpoint)
    or 3 (3M), epsilon prediction, as diffusers' DPMSolverMultistepScheduler takes its steps."""
    if config.order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ runs at order 1, 2 or 3 (got {config.order})")
    if not 1 <= num_steps <= len(alphas_cumprod):
        raise ValueError(f"num_steps must be from 1 to {len(alphas_cumprod)}, the training timesteps (got {num_steps})")
    timesteps, sigmas = timesteps_and_sigmas(alphas_cumprod, num_steps, config)
    alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
    with np.errstate(divide="ignore"):  # the final sigma may be 0: lambda = +inf there
        lambdas = np.log(alphas) - np.log(sigmas * alphas)

    coefficients = []
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        alpha_s, alpha_next = alphas[i], alphas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        # alpha_next * (1 - e^-h): the x0 weight of the first-order (DDIM) update. At a zero
        # final sigma h = inf and the update lands exactly on x0.
        phi = alpha_next * -math.expm1(-h)
        b, prev = _multistep_weights(
            _step_order(i, num_steps, h, config), phi, alpha_next, h, lambdas[max(i - 2, 0) : i + 1]
        )
        coefficients.append(
            StepCoefficients(
                timestep=int(t),
                x_scale=float(1.0 / alpha_s),
                eps_scale=float(s),  # sigma_t / alpha_t = sigma
                a=float((s_next * alpha_next) / (s * alpha_s)),  # sigma_t ratio, sigma_t = sigma * alpha
                b=float(b),
                prev=tuple(float(w) for w in prev),
            )
        )
    return coefficients


def _step_order(i: int, num_steps: int, h: float, config: SamplerConfig) -> int:
    """The order step i runs at: diffusers' warm-up (as many previous x0 as exist) and its
    lower orders at the end of short runs, which keep few-step sampling stable."""
    last, second_last = i == num_steps - 1, i == num_steps - 2
    short = config.lower_order_final and num_steps < 15
    if h == 0 or (last and (config.final_sigma == "zero" or short)):
        # h == 0: ends at sigma_min from t = 0, a zero-length step where x stays (phi = 0).
        return 1
    if second_last and short:
        return min(config.order, 2, i + 1)
    return min(config.order, i + 1)


def _multistep_weights(
    order: int, phi: float, alpha_next: float, h: float, lambdas: np.ndarray
) -> tuple[float, tuple[float, ...]]:
    """(weight of this step's x0, weights of the previous x0s, newest first) of one
    DPM-Solver++ update; `lambdas` ends with this step's and holds the previous ones it uses."""
    if order == 1:
        return phi, ()
    r0 = (lambdas[-1] - lambdas[-2]) / h
    if order == 2:
        # D0 + D1/2 with D1 = (x0 - x0_prev) / r0 (the midpoint rule)
        return phi * (1 + 0.5 / r0), (-phi * 0.5 / r0,)
    r1 = (lambdas[-2] - lambdas[-3]) / h
    # x_next = a x + phi D0 + k1 D1 + k2 D2 with D1_0 = (x0 - x0_prev) / r0, D1_1 = (x0_prev
    # - x0_prev2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1):
    # the third-order update, gathered by x0.
    k1 = alpha_next - phi / h
    k2 = -alpha_next * ((math.expm1(-h) + h) / h**2 - 0.5)
    q, p = r0 / (r0 + r1), 1.0 / (r0 + r1)
    u = k1 * (1 + q) + k2 * p  # weight of D1_0
    v = k1 * q + k2 * p  # weight of -D1_1
    return phi + u / r0, (-u / r0 - v / r1, v / r1)
