"""The fused sampler step against the eager PyTorch step (guidance on, second order).

`pytest bench/bench_step.py --benchmark-only`. Effective bandwidth counts the minimum
traffic of one step: read x, eps_cond, eps_uncond, x0_prev; write x_next, x0.
"""

import pytest
import torch
from diffusers import DDPMScheduler

from glyph_engine import cpp_ext
from glyph_engine.sampler import dpmpp_step
from glyph_engine.schedule import dpmpp_coefficients

COEF = dpmpp_coefficients(DDPMScheduler().alphas_cumprod.numpy(), 20)[5]  # a second-order step
STEPS = {"eager": dpmpp_step, "fused": cpp_ext.fused_dpmpp_step}


@pytest.mark.parametrize("impl", list(STEPS))
@pytest.mark.parametrize("batch", [64, 128])
def test_step(benchmark, impl, batch):
    if impl == "fused" and not cpp_ext.available():
        pytest.skip(f"fused op unavailable: {cpp_ext.load()}")
    gen = torch.Generator().manual_seed(0)
    x, ec, eu, xp = (torch.randn(batch, 1, 128, 128, generator=gen) for _ in range(4))
    benchmark.group = f"sampler step, batch {batch} of 1x128x128, FP32, guidance on"
    benchmark.pedantic(STEPS[impl], args=(x, ec, eu, xp, COEF, 7.5), rounds=20, warmup_rounds=3, iterations=1)
    moved = 6 * x.numel() * x.element_size()
    benchmark.extra_info["GB_per_s"] = moved / benchmark.stats.stats.median / 1e9
