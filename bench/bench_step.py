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
GUIDANCE = 7.5
DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-fp16",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


def eager(x, ec, eu, xp):
    return dpmpp_step(x, ec, eu, (xp,), COEF, GUIDANCE)


def fused(x, ec, eu, xp):
    return cpp_ext.dpmpp_step(x, ec, eu, xp, GUIDANCE, COEF.x_scale, COEF.eps_scale, COEF.a, COEF.b, COEF.prev[0])


STEPS = {"eager": eager, "fused": fused}


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize("impl", list(STEPS))
@pytest.mark.parametrize("batch", [64, 128])
def test_step(benchmark, impl, batch, device, dtype):
    if impl == "fused" and not cpp_ext.available(device):
        pytest.skip(f"fused op unavailable on {device}: {cpp_ext.status()[device]}")
    gen = torch.Generator().manual_seed(0)
    x, ec, eu, xp = (torch.randn(batch, 1, 128, 128, generator=gen).to(device, dtype) for _ in range(4))
    step = STEPS[impl]

    def step_and_wait():
        # CUDA launches return before the kernels finish: the clock must stop after them.
        out = step(x, ec, eu, xp)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    name = str(dtype).removeprefix("torch.")
    benchmark.group = f"sampler step, {device} {name}, batch {batch} of 1x128x128, guidance on"
    benchmark.pedantic(step_and_wait, rounds=20, warmup_rounds=3, iterations=1)
    moved = 6 * x.numel() * x.element_size()
    benchmark.extra_info["GB_per_s"] = moved / benchmark.stats.stats.median / 1e9
