"""What this CPU's vector units can do, read at run time: machines of one project differ
(some have AVX-512 with BF16 and VNNI, some AVX2 only), so nothing is assumed from a name."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The flags that change which precision and kernels are fastest.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: tuple[str, ...]  # the RELEVANT_FLAGS this CPU has
    cores: int  # usable by this process

    @property
    def has_bf16(self) -> bool:
        """Native BF16 arithmetic; without it BF16 is emulated and slower than FP32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def has_int8(self) -> bool:
        """Int8 dot-product units (VNNI or AMX)."""
        return "avx512_vnni" in self.flags or "amx_int8" in self.flags


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    try:
        fields = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        fields = {}  # not Linux: no flags known, so nothing beyond FP32 is assumed
    flags = set(fields.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        flags=tuple(f for f in RELEVANT_FLAGS if f in flags),
        cores=cores,
    )
