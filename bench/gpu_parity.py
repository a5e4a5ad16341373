"""make gpu-check, step 3 (parity.json): the fused op (`glyph_engine.cpp_ext`) built, then
checked against the eager formula (`sampler.dpmpp_step`) through the pipeline's own adapter
(`step.fused_dpmpp_step`): every flag combination of the op (tests/step_flags.py, shared with
tests/test_cpp_ext.py) x FP32/FP16, odd element counts, misaligned views (`x[1:]`); on CUDA
also a non-default stream and 2^31+3 FP16 elements."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glyph_engine import cpp_ext
from glyph_engine.sampler import dpmpp_step
from glyph_engine.schedule import StepCoefficients, dpmpp_coefficients
from glyph_engine.step import fused_dpmpp_step

from step_flags import FLAGS

GUIDANCE = 7.5
CLAMP = (0.0, 1.0)
MAIN = 64 * 128 * 128  # a batch of 64 full-size glyphs
HUGE = 2**31 + 3  # past 32-bit indexing, and odd: the scalar path
CHUNK = 2**26  # elements compared at a time: the FP32 reference of 2^31 elements would need 40 GiB


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    numel: int
    guided: bool
    second_order: bool
    clamp: bool
    misaligned: bool = False  # x[1:] of a larger tensor: the float4/half2 paths must not be taken
    side_stream: bool = False  # queued on a non-default stream, behind the copy that fills x

    @property
    def name(self) -> str:
        flags = [f for f, on in (("guided", self.guided), ("order2", self.second_order), ("clamp", self.clamp)) if on]
        extra = [f for f, on in (("misaligned", self.misaligned), ("side-stream", self.side_stream)) if on]
        dtype = str(self.dtype).removeprefix("torch.")
        return " ".join([self.device, dtype, f"n={self.numel}", *flags, *extra])


def sweep(device: str, quick: bool) -> list[Case]:
    sizes = (4096, 1, 7, 1023) if quick else (MAIN, 1, 7, 1023, 65537)
    misaligned = (4096,) if quick else (4096, 65537)
    cases = [
        Case(device, dtype, n, **flags._asdict(), misaligned=shifted)
        for dtype in (torch.float32, torch.float16)
        for flags in FLAGS
        for n, shifted in [*((n, False) for n in sizes), *((n, True) for n in misaligned)]
    ]
    if device == "cuda":
        cases += [
            Case(device, dtype, MAIN, True, True, True, side_stream=True) for dtype in (torch.float32, torch.float16)
        ]
        cases.append(Case(device, torch.float16, HUGE, True, True, True))
    return cases


def coefficients() -> tuple[StepCoefficients, StepCoefficients]:
    """A first-order step (x_scale 157 at the first of 10 steps: a hard case) and a second-order one,
    on the glyffuser's training schedule (diffusers' linear betas, 1e-4 to 0.02 over 1000 steps)."""
    steps = dpmpp_coefficients(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)), 10)
    return steps[0], steps[4]


def tolerance(case: Case, coef: StepCoefficients) -> tuple[float, float]:
    """(rtol, atol), as tests/test_cpp_ext.py: FP16 may differ by its final rounding (one ulp,
    2^-10 relative); FP32 on the CPU is built without FMA contraction and matches to rounding;
    on CUDA the GPU contracts to FMA: a few ulps of the largest term, x_scale * x."""
    if case.dtype == torch.float16:
        return 1e-3, 1e-3
    if case.device == "cpu":
        return 1e-6, 1e-6
    return 1e-5, 1e-5 * max(1.0, coef.x_scale)


def inputs(case: Case) -> list[Tensor]:
    """x, eps_cond, eps_uncond, x0_prev: standard normal, made on the case's device (2^31
    elements would take minutes on the host)."""
    gen = torch.Generator(case.device).manual_seed(case.numel)
    shift = 1 if case.misaligned else 0
    return [
        torch.randn(case.numel + shift, generator=gen, device=case.device, dtype=case.dtype)[shift:] for _ in range(4)
    ]


def reference(x: Tensor, ec: Tensor, eu: Tensor | None, xp: Tensor | None, coef, clamp) -> tuple[Tensor, Tensor]:
    """The eager step in FP32 on the same inputs, rounded to their dtype: what the op computes."""
    up = [None if t is None else t.float() for t in (x, ec, eu)]
    history = () if xp is None else (xp.float(),)
    return tuple(t.to(x.dtype) for t in dpmpp_step(*up, history, coef, GUIDANCE, clamp))


def on_side_stream(op: Callable[..., tuple[Tensor, Tensor]], x: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    """`op` on a copy of x made on a side stream after tens of milliseconds of GPU work there:
    a kernel queued on any stream but torch's current one would read the copy before it lands."""
    late = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late.copy_(x)
        out = op(late, *rest)
    torch.cuda.current_stream().wait_stream(side)
    return out


def check_case(case: Case, op: Callable[..., tuple[Tensor, Tensor]] = fused_dpmpp_step) -> dict[str, Any]:
    """Runs `op` (the op as the pipeline calls it, by default) on the case's inputs and
    compares it with the eager reference, chunk by chunk."""
    first, second = coefficients()
    coef = second if case.second_order else first
    x, ec, eu, xp = inputs(case)
    eu = eu if case.guided else None
    xp = xp if case.second_order else None
    clamp = CLAMP if case.clamp else None
    args = (ec, eu, () if xp is None else (xp,), coef, GUIDANCE, clamp)
    ours = on_side_stream(op, x, *args) if case.side_stream else op(x, *args)
    rtol, atol = tolerance(case, coef)
    worst, close = 0.0, all(t.dtype == x.dtype and t.shape == x.shape and t.device == x.device for t in ours)
    for start in range(0, case.numel, CHUNK):
        part = slice(start, start + CHUNK)
        ref = reference(*(None if t is None else t[part] for t in (x, ec, eu, xp)), coef, clamp)
        for got, expected in zip(ours, ref, strict=True):
            expected = expected.float()
            diff = (got[part].float() - expected).abs()
            worst = max(worst, diff.max().item())
            close = close and bool((diff <= atol + rtol * expected.abs()).all())  # NaN fails too
    return {
        "name": case.name,
        **{k: v for k, v in asdict(case).items() if k != "dtype"},
        "dtype": str(case.dtype).removeprefix("torch."),
        "address_mod_16": x.data_ptr() % 16,
        "max_abs_error": worst,
        "rtol": rtol,
        "atol": atol,
        "passed": close,
    }


def memory_problem(case: Case) -> str | None:
    """Why a CUDA case cannot run here: its six tensors and the chunked reference must fit."""
    if case.device != "cuda":
        return None
    needed = 6 * case.numel * case.dtype.itemsize + 16 * CHUNK * 4
    free = torch.cuda.mem_get_info()[0]
    return None if free >= needed else f"needs {needed / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free"


def parity(cuda: bool, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    status = cpp_ext.status()  # builds the op for each device it can (cached by torch afterwards)
    build_seconds = round(time.perf_counter() - start, 1)
    cases, skipped = [], []
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        if status[device] is not None:
            cases.append({"name": f"{device}: the op is built", "passed": False, "error": status[device]})
            continue
        for case in sweep(device, quick):
            problem = memory_problem(case)
            if problem is None:
                cases.append(check_case(case))
            else:
                skipped.append({"name": case.name, "reason": problem})
        if device == "cuda":
            torch.cuda.empty_cache()  # the 2^31 case's blocks, before the pytest runs need the GPU
    failed = [c["name"] for c in cases if not c["passed"]]
    return {
        "passed": not failed,
        "op_status": status,
        "build_seconds": build_seconds,
        "failed": failed,
        "skipped": skipped,
        "cases": cases,
    }
