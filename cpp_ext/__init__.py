"""The fused DPM-Solver++ step: one op, `torch.ops.glyph_engine.dpmpp_step`, in C++/CUDA.

Compiled on first use with torch's JIT extension builder (ninja and a C++ compiler; nvcc
too for the CUDA kernel) and cached by torch in its extensions folder: CPU-only installs
need no compiler at install time, and the kernel is built for the machine that runs it.
Each device is built for on its own: a missing or mismatched nvcc costs the CUDA kernel,
not the CPU one, and `status()` says why a device has no op.

A leaf package: raw tensors and floats in, no imports from the rest of glyph_engine, so
the engine decides how to fall back (its pure-PyTorch `sampler.dpmpp_step` is the
reference the op is tested against).
"""

from __future__ import annotations

import logging
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_CPU_SOURCES = ["dpmpp_step.cpp"]
_CUDA_SOURCES = ["dpmpp_step_cuda.cpp", "dpmpp_step_kernel.cu"]


class OpUnavailable(RuntimeError):
    """The op is not built for the input's device; the message says why."""


@lru_cache(maxsize=1)
def status() -> dict[str, str | None]:
    """{"cpu": ..., "cuda": ...}: None where the op is built for that device, else why not.

    Builds on the first call (cached per machine by torch, per process here).
    """
    from torch.utils import cpp_extension

    nvcc = _nvcc_version(cpp_extension.CUDA_HOME) if torch.version.cuda else None
    cuda = _cuda_build_problem(torch.version.cuda, nvcc)
    if cuda is None:
        cuda = _build(with_cuda=True)
        if cuda is None:
            return {"cpu": None, "cuda": None}
        cuda = f"the CUDA build failed: {cuda}"
    return {"cpu": _build(with_cuda=False), "cuda": cuda}


def available(device: str | torch.device = "cpu") -> bool:
    """Whether the op is built for `device`'s type ("cpu", "cuda", torch.device("cuda:0"))."""
    return _problem(torch.device(device).type) is None


def dpmpp_step(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    x0_prev: Tensor | None,
    guidance: float,
    x_scale: float,
    eps_scale: float,
    a: float,
    b: float,
    c: float,
    clamp_min: float | None = None,
    clamp_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++ step in one pass; returns (x_next, x0) in x's dtype.

    Per element, in FP32: eps = eps_uncond + guidance * (eps_cond - eps_uncond) when
    eps_uncond is given, else eps_cond; x0 = x_scale * x - eps_scale * eps, clamped to
    [clamp_min, clamp_max] when given (NaN stays NaN, as in torch.clamp);
    x_next = a * x + b * x0 (+ c * x0_prev when c != 0).
    The noise predictions and x0_prev are cast to x's dtype: the op takes one dtype.
    Raises OpUnavailable when the op is not built for x's device.
    """
    if c != 0.0 and x0_prev is None:
        raise ValueError("a second-order step (c != 0) needs the previous step's x0")
    problem = _problem(x.device.type)
    if problem is not None:
        raise OpUnavailable(f"glyph_engine::dpmpp_step is not available on {x.device.type}: {problem}")

    def prepare(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(x.dtype).contiguous()

    return torch.ops.glyph_engine.dpmpp_step(
        x.contiguous(),
        prepare(eps_cond),
        prepare(eps_uncond),
        prepare(x0_prev) if c != 0.0 else None,  # the op is second order exactly when given one
        float(guidance),
        float(x_scale),
        float(eps_scale),
        float(a),
        float(b),
        float(c),
        clamp_min,
        clamp_max,
    )


def _problem(device_type: str) -> str | None:
    return status().get(device_type, f"the op has no {device_type} implementation")


def _cuda_build_problem(torch_cuda: str | None, nvcc_version: str | None) -> str | None:
    """None when the CUDA kernel can be built, else why not.

    torch_cuda is `torch.version.cuda` ("13.0", None on a CPU build); nvcc_version is what
    `nvcc --version` reports ("13.0", None without nvcc). An extension must be compiled by
    the CUDA major version PyTorch was built with; torch's builder refuses otherwise, and
    that refusal would cost the CPU op too.
    """
    if torch_cuda is None:
        return "this PyTorch has no CUDA"
    if nvcc_version is None:
        return "nvcc not found"
    if nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        return f"nvcc is CUDA {nvcc_version} but this PyTorch was built with CUDA {torch_cuda}"
    return None


def _nvcc_version(cuda_home: str | None) -> str | None:
    """The CUDA version of CUDA_HOME's nvcc ("13.0" from "release 13.0, V13.0.88"); None without one."""
    if cuda_home is None:
        return None
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _build(with_cuda: bool) -> str | None:
    """Builds (cached per machine by torch) and loads the op; returns None or why it failed."""
    try:
        from torch.utils import cpp_extension

        sources = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else [])
        cpp_extension.load(
            # Separate names: the two builds have different sources and must not share a cache.
            name="glyph_engine_ops_cuda" if with_cuda else "glyph_engine_ops",
            sources=[str(CSRC / s) for s in sources],
            # -ffp-contract=off: no FMA contraction, so FP32 results equal eager PyTorch's
            # op-by-op rounding exactly.
            extra_cflags=["-O3", "-ffp-contract=off"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "no op here"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        logger.info("fused step %s build failed: %s", "CUDA" if with_cuda else "CPU", reason)
        return reason
    return None  # the op's shape-only (Meta) kernel is registered by the library itself, for tracing
