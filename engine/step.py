"""Which sampler step runs: the fused C++/CUDA op (`glyph_engine.cpp_ext`) or the eager
PyTorch formula (`sampler.dpmpp_step`, the reference the op is tested against).

cpp_ext is a leaf that takes raw tensors and floats; this module adapts it to the
sampler's step signature and decides, per device, whether it can be used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glyph_engine import cpp_ext
from glyph_engine.errors import GlyphEngineError
from glyph_engine.sampler import StepFn, dpmpp_step
from glyph_engine.samplers import Sampler
from glyph_engine.schedule import StepCoefficients
from glyph_engine.settings import StepImpl

FUSED_MAX_ORDER = 2  # the op's update: a x + b x0 + c x0_prev


def fused_dpmpp_step(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    history: Sequence[Tensor],
    coef: StepCoefficients,
    guidance: float,
    clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """`sampler.dpmpp_step` in one pass of the fused op: same arguments, same results, for
    steps of order 2 at most (the op takes one previous x0)."""
    if len(coef.prev) > FUSED_MAX_ORDER - 1:
        raise ValueError(f"the fused op runs steps of order {FUSED_MAX_ORDER} at most (got {len(coef.prev) + 1})")
    x0_prev, c = history[0] if history else None, coef.prev[0] if coef.prev else 0.0
    low, high = clamp if clamp is not None else (None, None)
    return cpp_ext.dpmpp_step(
        x, eps_cond, eps_uncond, x0_prev, guidance, coef.x_scale, coef.eps_scale, coef.a, coef.b, c, low, high
    )


def _unavailable_reason(device: torch.device) -> str | None:
    return cpp_ext.status().get(device.type, f"the op has no {device.type} implementation")


def select_step(impl: StepImpl | str, device: torch.device, sampler: Sampler) -> tuple[StepFn, StepImpl]:
    """(step function, what it is) for running `sampler` on `device`."""
    impl = StepImpl(impl)
    if impl is StepImpl.torch:
        return dpmpp_step, StepImpl.torch
    if not sampler.fused:
        if impl is StepImpl.fused:
            raise GlyphEngineError(
                f"the fused step does not run --sampler {sampler.name} (its steps use more than one previous x0); "
                "use --step-impl torch or auto."
            )
        return dpmpp_step, StepImpl.torch
    reason = _unavailable_reason(device)
    if reason is None:
        return fused_dpmpp_step, StepImpl.fused
    if impl is StepImpl.fused:
        raise GlyphEngineError(
            f"the fused step is not built for {device.type.upper()} ({reason}); use --step-impl torch."
        )
    return dpmpp_step, StepImpl.torch


def status_rows() -> list[tuple[str, str]]:
    """`glyph-engine info`: per device, whether the fused op is built (and why not)."""
    return [
        (f"fused step {device.upper()}", "built" if reason is None else f"not built ({reason})")
        for device, reason in cpp_ext.status().items()
    ]
