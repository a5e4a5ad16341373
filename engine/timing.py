"""The one timer: wall time of a call, with the device's queued work counted in.

CUDA launches return before the work is done; reading the clock without synchronising
would time the launches only. Every measurement in glyph-engine (the bench command, the
export's backend choice, the pytest-benchmark suite) goes through here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

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


def matmul_flops_per_second(device: torch.device | str, repeats: int = 5) -> tuple[float, dict[str, object]]:
    """The device's practical matrix-multiply rate, the ceiling a U-Net can reach there.

    Measured in the precision the backends compute in on that device: FP16 on a GPU, at a
    size that fills an H100 (8192^3); FP32 on a CPU (2048^3, a few tenths of a second on 2
    cores). Returns (FLOP/s, how it was measured).
    """
    device = torch.device(device)
    dtype, size = (torch.float16, 8192) if device.type == "cuda" else (torch.float32, 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=2, device=device)
    return 2 * size**3 / seconds, {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "size": size}
