"""The fused DPM-Solver++ step: one op, `torch.ops.glyph_engine.dpmpp_step`, in C++/CUDA.

Compiled on first use with torch's JIT extension builder (ninja and a C++ compiler; nvcc
too when PyTorch has CUDA) and cached by torch in its extensions folder: CPU-only installs
need no compiler at install time, and the kernel is built for the machine that runs it.
Without a compiler the sampler keeps the pure-PyTorch step (`sampler.dpmpp_step`, the
reference the op is tested against) and `glyph-engine info` says why.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.sampler import StepFn, dpmpp_step
from glyph_engine.schedule import StepCoefficients

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
StepImpl = Literal["auto", "fused", "torch"]


@lru_cache(maxsize=1)
def load() -> str | None:
    """Builds (once per machine, cached) and loads the op; returns None or why it is unavailable."""
    try:
        from torch.utils import cpp_extension

        sources = [CSRC / "dpmpp_step.cpp"]
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
        if with_cuda:
            sources += [CSRC / "dpmpp_step_cuda.cpp", CSRC / "dpmpp_step_kernel.cu"]
        cpp_extension.load(
            name="glyph_engine_ops_cuda" if with_cuda else "glyph_engine_ops",
            sources=[str(s) for s in sources],
            # -ffp-contract=off: no FMA contraction, so FP32 results equal eager PyTorch's
            # op-by-op rounding exactly.
            extra_cflags=["-O3", "-ffp-contract=off"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "use PyTorch"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        logger.info("fused step unavailable: %s", reason)
        return reason
    _register_fake()
    return None


def _register_fake() -> None:
    """Shape-only implementation, so torch.compile and meta tensors can trace through the op."""

    @torch.library.register_fake("glyph_engine::dpmpp_step")
    def _(x, eps_cond, eps_uncond, x0_prev, guidance, x_scale, eps_scale, a, b, c, clamp_min, clamp_max):
        return torch.empty_like(x), torch.empty_like(x)


def available() -> bool:
    return load() is None


def status() -> str:
    """One line for `glyph-engine info`."""
    reason = load()
    if reason is None:
        devices = "CPU" + (" and CUDA" if torch.version.cuda is not None else "")
        return f"fused (glyph_engine::dpmpp_step, C++ for {devices})"
    return f"torch (the fused op could not be built: {reason})"


def fused_dpmpp_step(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    x0_prev: Tensor | None,
    coef: StepCoefficients,
    guidance: float,
    clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """`sampler.dpmpp_step` in one pass: same arguments, same results (FP32 math)."""

    def prepare(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(x.dtype).contiguous()

    if coef.c != 0.0 and x0_prev is None:
        raise ValueError("a second-order step needs the previous step's x0")
    reason = load()  # cached after the first call
    if reason is not None:
        raise GlyphEngineError(f"the fused step is unavailable ({reason}); use --step-impl torch.")
    return torch.ops.glyph_engine.dpmpp_step(
        x.contiguous(),
        prepare(eps_cond),
        prepare(eps_uncond),
        prepare(x0_prev) if coef.c != 0.0 else None,
        float(guidance),
        coef.x_scale,
        coef.eps_scale,
        coef.a,
        coef.b,
        coef.c,
        clamp[0] if clamp else None,
        clamp[1] if clamp else None,
    )


def select_step(impl: StepImpl) -> tuple[StepFn, str]:
    """(step function, its name): "fused" needs the op, "auto" uses it when it builds."""
    if impl == "torch":
        return dpmpp_step, "torch"
    reason = load()
    if reason is None:
        return fused_dpmpp_step, "fused"
    if impl == "fused":
        raise GlyphEngineError(f"the fused step is unavailable ({reason}); use --step-impl torch.")
    return dpmpp_step, "torch"
