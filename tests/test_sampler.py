"""The sampler against diffusers' DPMSolverMultistepScheduler, the glyffuser's own sampler."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep

from glyph_engine.sampler import dpmpp_step, initial_noise, sample_dpmpp
from glyph_engine.samplers import SAMPLERS
from glyph_engine.schedule import SamplerConfig, dpmpp_coefficients

from sampler_cases import ALPHAS_CUMPROD, toy_eps


class _Float64Module:
    """A module proxy whose `float32` is `float64`.

    diffusers' scheduler rounds its sigmas and each sample to float32; with this proxy in
    place of its `np` and `torch` globals the same diffusers code runs in float64, so the
    comparison with our float64 sampler measures algorithmic differences, not rounding.
    """

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


@pytest.fixture
def diffusers_in_float64(monkeypatch):
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "np", _Float64Module(np))
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "torch", _Float64Module(torch))


def make_scheduler(config: SamplerConfig) -> DPMSolverMultistepScheduler:
    """diffusers' scheduler that the registered sampler `config.name` names, as configured."""
    sampler = SAMPLERS[config.name]
    assert sampler.diffusers.startswith("DPMSolverMultistepScheduler(")
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=config.order or sampler.order,
        timestep_spacing=config.spacing,
        use_karras_sigmas=config.karras_sigmas,
        lower_order_final=config.lower_order_final,
        final_sigmas_type=config.final_sigma,
    )


def compare(
    x: torch.Tensor, steps: int, config: SamplerConfig, eps_fn, guidance=1.0, uncond_fn=None, reference_config=None
):
    """(ours, diffusers) final samples from the same noise, on the scheduler's own schedule;
    diffusers runs `reference_config` where given, else `config`."""
    scheduler = make_scheduler(reference_config or config)
    coefficients = SAMPLERS[config.name].coefficients(scheduler.alphas_cumprod.numpy(), steps, config)
    if uncond_fn is None:
        ours = sample_dpmpp(lambda x, t: (eps_fn(x, t), None), x.clone(), coefficients)
        guided = eps_fn
    else:
        ours = sample_dpmpp(lambda x, t: (eps_fn(x, t), uncond_fn(x, t)), x.clone(), coefficients, guidance)

        def guided(x, t):
            return uncond_fn(x, t) + guidance * (eps_fn(x, t) - uncond_fn(x, t))

    scheduler.set_timesteps(steps)
    ref = x.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(guided(ref, int(t)), t, ref).prev_sample
    return ours, ref


CONFIGS = [
    SamplerConfig(spacing=spacing, karras_sigmas=karras)
    for spacing, karras in itertools.product(["linspace", "leading", "trailing"], [False, True])
    if not (karras and spacing != "linspace")  # Karras sigmas ignore the spacing
] + [
    SamplerConfig(order=1),
    SamplerConfig(final_sigma="sigma_min"),
    SamplerConfig(final_sigma="sigma_min", lower_order_final=False),
    # DPM-Solver++(3M): diffusers' same scheduler with solver_order=3
    SamplerConfig(name="dpmpp-3m"),
    SamplerConfig(name="dpmpp-3m", spacing="trailing"),
    SamplerConfig(name="dpmpp-3m", karras_sigmas=True),
    SamplerConfig(name="dpmpp-3m", final_sigma="sigma_min", lower_order_final=False),
    SamplerConfig(name="dpmpp-3m", order=2),
]


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20, 50])
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_full_trajectory_matches_diffusers(steps, config, diffusers_in_float64):
    x = initial_noise([7, 8, 9], (1, 8, 8), dtype=torch.float64)
    ours, ref = compare(x, steps, config, toy_eps)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# At 1000 steps ending at sigma_min the last step has zero length; diffusers' third-order
# update divides by it (NaN), where ours (and diffusers' 2M) take it at first order.
AT_MAXIMUM = [c for c in CONFIGS if not (c.name == "dpmpp-3m" and c.final_sigma == "sigma_min")]


@pytest.mark.parametrize("config", AT_MAXIMUM, ids=repr)
def test_the_maximum_step_count_takes_every_training_timestep(config, diffusers_in_float64):
    """At 1000 steps (the training timesteps, the most `generate` takes) every spacing walks
    t = 999 .. 0 once, as diffusers' "trailing" spacing does; diffusers' own "linspace" repeats
    a timestep there and ends in NaN, and its "leading" fails. Karras sigmas keep their ramp."""
    x = initial_noise([7, 8, 9], (1, 8, 8), dtype=torch.float64)
    reference = config if config.karras_sigmas else dataclasses.replace(config, spacing="trailing")
    ours, ref = compare(x, 1000, config, toy_eps, reference_config=reference)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if not config.karras_sigmas:
        assert [c.timestep for c in SAMPLERS[config.name].coefficients(ALPHAS_CUMPROD, 1000, config)] == list(
            range(999, -1, -1)
        )


def test_more_steps_than_training_timesteps_are_refused():
    with pytest.raises(ValueError, match="from 1 to 1000"):
        dpmpp_coefficients(ALPHAS_CUMPROD, 1001)


@pytest.mark.parametrize("steps", [1, 20])
def test_float32_matches_unpatched_diffusers(steps):
    """In float32, as generation runs, the results agree to float32 rounding."""
    x = initial_noise([7, 8, 9], (1, 8, 8))
    ours, ref = compare(x, steps, SamplerConfig(), toy_eps)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [3, 20])
def test_timesteps_match_diffusers(steps):
    for config in CONFIGS:
        scheduler = make_scheduler(config)
        scheduler.set_timesteps(steps)
        ours = [c.timestep for c in SAMPLERS[config.name].coefficients(ALPHAS_CUMPROD, steps, config)]
        assert ours == scheduler.timesteps.tolist()


def test_guidance_matches_diffusers_on_combined_eps(diffusers_in_float64):
    """CFG in the step equals diffusers fed the guided noise prediction."""
    guidance = 7.5

    def uncond(x, t):
        return 0.5 * toy_eps(x, t) - 0.1

    x = initial_noise([1, 2], (1, 6, 6), dtype=torch.float64)
    ours, ref = compare(x, 20, SamplerConfig(), toy_eps, guidance, uncond)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_final_step_lands_on_x0():
    coefficients = dpmpp_coefficients(ALPHAS_CUMPROD, 10)
    last = coefficients[-1]
    assert (last.a, last.b, last.prev) == (0.0, 1.0, ())


def test_clamp_limits_x0():
    x = torch.full((1, 1, 2, 2), 5.0)
    eps = torch.zeros_like(x)
    coef = dpmpp_coefficients(ALPHAS_CUMPROD, 5)[2]
    _, x0 = dpmpp_step(x, eps, None, (x,), coef, 1.0, clamp=(0.0, 1.0))
    assert float(x0.max()) == 1.0


def test_second_order_step_needs_history():
    coef = dpmpp_coefficients(ALPHAS_CUMPROD, 5)[2]
    assert coef.prev[0] != 0.0
    with pytest.raises(ValueError, match="previous"):
        dpmpp_step(torch.zeros(1), torch.zeros(1), None, (), coef, 1.0)


def test_noise_is_per_sample():
    a = initial_noise([3, 4, 5], (1, 4, 4))
    b = initial_noise([4], (1, 4, 4))
    torch.testing.assert_close(a[1:2], b, rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])


def test_coefficients_are_float64_exact_for_order1():
    """First-order coefficients reproduce DDIM's closed form."""
    coefficients = dpmpp_coefficients(ALPHAS_CUMPROD, 4, SamplerConfig(order=1))
    t0, t1 = coefficients[0].timestep, coefficients[1].timestep
    abar0, abar1 = float(ALPHAS_CUMPROD[t0]), float(ALPHAS_CUMPROD[t1])
    # DDIM: x_next = sqrt(abar1) * x0 + sqrt(1 - abar1) * eps, with eps = (x - sqrt(abar0) x0) / sqrt(1 - abar0)
    a = np.sqrt(1 - abar1) / np.sqrt(1 - abar0)
    b = np.sqrt(abar1) - a * np.sqrt(abar0)
    assert coefficients[0].a == pytest.approx(a, rel=1e-12)
    assert coefficients[0].b == pytest.approx(b, rel=1e-12)


def test_a_sampler_is_one_registry_entry(monkeypatch, model):
    """A sampler registered in SAMPLERS alone runs through generate and is recorded by name:
    here DDIM, which is DPM-Solver++ at first order."""
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.samplers import Sampler
    from glyph_engine.session import Session
    from glyph_engine.settings import GenerationSettings

    monkeypatch.setitem(SAMPLERS, "ddim", Sampler("ddim", "DDIM", 1, True, "DDIMScheduler", dpmpp_coefficients))
    session = Session(model, TorchBackend(model, device="cpu"))
    ddim = session.generate(["metal"], 2, GenerationSettings(steps=4, sampler=SamplerConfig(name="ddim")))
    order1 = session.generate(["metal"], 2, GenerationSettings(steps=4, sampler=SamplerConfig(order=1)))
    torch.testing.assert_close(ddim.images, order1.images, rtol=0, atol=0)
    assert session.metadata(ddim)["sampler"] == "ddim order 1, linspace"
