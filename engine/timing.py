"""The one timer: wall time of a call, with the device's queued work counted in.

CUDA launches return before the work is done; reading the clock without synchronising
would time the launches only. Every measurement in glyph-engine (the bench command, the
export's backend choice, the pytest-benchmark suite) goes through here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from glyph_engine.cpu import kernel_cpu

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Waits for `device`'s queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], T], device: torch.device | str) -> Callable[[], T]:
    """`fn` followed by a wait for `device`: what pytest-benchmark should time."""

    def call() -> T:
        result = fn()
        synchronize(device)
        return result

    return call


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device | str) -> float:
    """Median wall time of `fn` on `device` after `warmup` untimed calls."""
    timed = synchronized(fn, device)
    for _ in range(warmup):
        timed()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Products per timed call: one 2048^3 product takes a few tenths of a second on 2 CPU cores;
# 8192^3 fills an H100 but takes about a millisecond there, so ten per call keep the
# synchronisation a small part of what is timed.
MATMUL_SHAPES = {"cpu": (2048, 1), "cuda": (8192, 10)}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


@dataclass(frozen=True)
class MatmulPeak:
    """A device's practical matrix-multiply rate in one precision: the ceiling a U-Net that
    computes in that precision can reach there."""

    device: str
    precision: str  # "fp32", "bf16", "fp16" or "int8", as `Backend.precision` names them
    flops_per_s: float | None  # None: no honest figure here; `note` says why
    size: int  # n of the n x n x n products timed
    note: str = ""  # how it was measured, or why it was not


def matmul_peak(device: torch.device | str, precision: str, repeats: int = 5) -> MatmulPeak:
    """The practical matrix-multiply rate of `device` in `precision`, measured now.

    A U-Net's rate is only comparable with the peak of the precision it computes in: a bf16
    U-Net divided by the fp32 rate reads above 100%. On a CPU, bf16 and int8 are measured only
    where the CPU has units for them as its kernels see it (`kernel_cpu`: capped by
    $ONEDNN_MAX_CPU_ISA, not masked by $GLYPH_ENGINE_CPU_FLAGS), and int8 only when torch's
    int8 product beats the CPU's fastest float one, i.e. uses those units; otherwise the peak
    is None and its note says why.
    """
    device = torch.device(device)
    size, per_call = MATMUL_SHAPES["cuda" if device.type == "cuda" else "cpu"]

    def unmeasured(why: str) -> MatmulPeak:
        return MatmulPeak(str(device), precision, None, size, why)

    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(_DTYPES)}")
    cpu = kernel_cpu()
    if device.type == "cpu":
        if precision == "fp16":
            return unmeasured("no backend computes in fp16 on a CPU")
        if precision == "bf16" and not cpu.has_bf16:
            return unmeasured("this CPU has no BF16 units (AVX-512 BF16 or AMX): bf16 runs emulated, no native peak")
        if precision == "int8" and not cpu.has_int8:
            return unmeasured("this CPU has no int8 units (AVX-512 VNNI or AMX): no native int8 peak")
    elif precision == "int8":
        return unmeasured("no backend computes in int8 on a GPU")
    rate = _timed_products(device, _DTYPES[precision], size, per_call, repeats)
    if precision != "int8":
        return MatmulPeak(str(device), precision, rate, size, f"torch {precision} matmul")
    # int8 units do at least twice the work per cycle of the widest float units beside them
    # (VNNI: 4 int8 products per 32-bit lane; AMX: twice its bf16 rate): an int8 product that
    # does not beat those floats does not use them, and would make int8 backends read above 100%.
    floats = "bf16" if cpu.has_bf16 else "fp32"
    beside = _timed_products(device, _DTYPES[floats], size, per_call, repeats)
    if rate <= beside:
        return unmeasured(
            f"torch's int8 product ({rate / 1e9:.0f} GOP/s) is no faster than its {floats} one ({beside / 1e9:.0f} "
            "GFLOP/s) here: it does not use the int8 units, so it is no int8 peak"
        )
    return MatmulPeak(
        str(device),
        precision,
        rate,
        size,
        f"torch._int_mm (int8 x int8 -> int32), {floats} {beside / 1e9:.0f} GFLOP/s beside it",
    )


def _timed_products(device: torch.device, dtype: torch.dtype, size: int, per_call: int, repeats: int) -> float:
    """Operations per second of `per_call` size^3 products in `dtype` on `device`."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (size, size), dtype=dtype, device=device) for _ in range(2))
        product = torch._int_mm  # the only int8 x int8 matmul torch has
    else:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        product = torch.matmul

    def products() -> None:
        for _ in range(per_call):
            product(a, b)

    return per_call * 2 * size**3 / median_seconds(products, repeats, warmup=2, device=device)
