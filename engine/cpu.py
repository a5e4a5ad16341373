"""What this CPU's vector units can do, read at run time: machines of one project differ
(some have AVX-512 with BF16 and VNNI, some AVX2 only), so nothing is assumed from a name.

$GLYPH_ENGINE_CPU_FLAGS, when set, replaces the detected flags (comma-separated, from
RELEVANT_FLAGS; empty: none). It changes glyph-engine's own choices only (the precision `auto`
takes, the artifact cache's key), not the kernels OpenVINO and PyTorch pick for the real CPU:
masking flags (e.g. "avx2,fma" on a BF16 machine) is exact; claiming flags the CPU lacks makes
OpenVINO emulate them (slower) or refuse the model, and glyph-engine warns once.

$ONEDNN_MAX_CPU_ISA, oneDNN's own cap on the instructions its kernels use, is honoured by the
kernels of both PyTorch and OpenVINO; glyph-engine reads it too, so that one variable makes the
whole process choose and compute as on a CPU of that kind (e.g. "avx2" on an AMX Xeon: fp32,
AVX2 kernels). The cap is named in the CPU's model string, which every benchmark records.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from glyph_engine.errors import GlyphEngineError

logger = logging.getLogger(__name__)

ENV_VAR = "GLYPH_ENGINE_CPU_FLAGS"
ISA_CAP_VAR = "ONEDNN_MAX_CPU_ISA"

# The flags that change which precision and kernels are fastest.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")

# oneDNN's ISA names (any case), each with the RELEVANT_FLAGS its kernels may still use; "all"
# and "default" lift the cap. AVX2_VNNI is VNNI on 256-bit registers, not AVX-512 VNNI.
_AVX2 = ("avx2", "fma")
_AVX512 = (*_AVX2, "avx512f")
_AVX512_VNNI = (*_AVX512, "avx512_vnni")
_AVX512_BF16 = (*_AVX512_VNNI, "avx512_bf16")
ISA_CAPS: dict[str, tuple[str, ...]] = {
    "sse41": (),
    "avx": (),
    "avx2": _AVX2,
    "avx2_vnni": _AVX2,
    "avx2_vnni_2": _AVX2,
    "avx512_core": _AVX512,
    "avx512_core_vnni": _AVX512_VNNI,
    "avx512_core_bf16": _AVX512_BF16,
    "avx512_core_fp16": _AVX512_BF16,
    "avx10_1_512": _AVX512_BF16,
    **dict.fromkeys(
        ("avx512_core_amx", "avx512_core_amx_fp16", "avx10_1_512_amx", "avx10_1_512_amx_fp16", "all", "default"),
        RELEVANT_FLAGS,
    ),
}

# The smaller CPU kinds of this project's machines (`pytest --cpu-kind`), by oneDNN's name of
# their instructions: what `kernel_caps` takes to run a process as on one of them.
CPU_KIND_ISAS = {"avx2": "avx2", "avx512": "avx512_core_vnni", "avx512-bf16": "avx512_core_bf16"}


@dataclass(frozen=True)
class CpuInfo:
    model: str  # the CPU's name, and the cap on its kernels where $ONEDNN_MAX_CPU_ISA sets one
    flags: tuple[str, ...]  # the RELEVANT_FLAGS this CPU has (or $GLYPH_ENGINE_CPU_FLAGS says it has)
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
def detected_cpu() -> CpuInfo:
    """This CPU as /proc/cpuinfo describes it, whatever $GLYPH_ENGINE_CPU_FLAGS says."""
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


def kernel_cpu() -> CpuInfo:
    """This CPU as PyTorch's and OpenVINO's kernels see it: capped by $ONEDNN_MAX_CPU_ISA,
    whatever $GLYPH_ENGINE_CPU_FLAGS says (it changes glyph-engine's choices, not the kernels)."""
    return capped(detected_cpu(), os.environ.get(ISA_CAP_VAR, ""))


def cpu_info() -> CpuInfo:
    """This CPU as its kernels see it (`kernel_cpu`), with the flags $GLYPH_ENGINE_CPU_FLAGS
    gives in place of those."""
    detected = kernel_cpu()
    forced = os.environ.get(ENV_VAR)
    if forced is None:
        return detected
    flags = forced_flags(forced)
    _warn_if_claimed(flags, detected.flags)
    return CpuInfo(model=detected.model, flags=flags, cores=detected.cores)


def kernel_caps(isa: str) -> dict[str, str]:
    """The environment that caps PyTorch's and OpenVINO's kernels at oneDNN's ISA `isa` (a key
    of ISA_CAPS), to be set before either runs a kernel: oneDNN's own cap, which both follow,
    and below AVX-512 those of PyTorch's vector loops (ATen) and of MKL (its fp32 matrix
    products), which do not follow oneDNN's."""
    caps = {ISA_CAP_VAR: isa}
    if "avx512f" not in ISA_CAPS[isa]:
        avx2 = "avx2" in ISA_CAPS[isa]
        caps["ATEN_CPU_CAPABILITY"] = "avx2" if avx2 else "default"
        caps["MKL_ENABLE_INSTRUCTIONS"] = "AVX2" if avx2 else "SSE4_2"
    return caps


def capped(cpu: CpuInfo, cap: str) -> CpuInfo:
    """`cpu` with the flags above oneDNN's ISA cap `cap` removed ("", "all", "default": no cap)."""
    name = cap.strip().lower()
    if not name:
        return cpu
    allowed = ISA_CAPS.get(name)
    if allowed is None:
        _warn_unknown_cap(cap)
        return cpu
    flags = tuple(f for f in cpu.flags if f in allowed)
    if flags == cpu.flags:
        return cpu  # a cap at or above this CPU: its kernels run as without one
    return CpuInfo(model=f"{cpu.model} (kernels capped at {name} by ${ISA_CAP_VAR})", flags=flags, cores=cpu.cores)


@lru_cache(maxsize=None)
def _warn_unknown_cap(cap: str) -> None:
    logger.warning(
        "%s=%s is not an ISA name oneDNN knows, so PyTorch's and OpenVINO's kernels ignore it and so does "
        "glyph-engine; use one of %s, or unset it.",
        ISA_CAP_VAR,
        cap,
        ", ".join(ISA_CAPS),
    )


def forced_flags(text: str) -> tuple[str, ...]:
    """The flags a $GLYPH_ENGINE_CPU_FLAGS value names, in RELEVANT_FLAGS order."""
    names = {n for n in re.split(r"[\s,]+", text.strip().lower()) if n}
    unknown = sorted(names - set(RELEVANT_FLAGS))
    if unknown:
        raise GlyphEngineError(
            f"{ENV_VAR} names {', '.join(unknown)}, which glyph-engine does not use; give a comma-separated list "
            f"of {', '.join(RELEVANT_FLAGS)} (empty: none), or unset it to use this CPU's own flags."
        )
    return tuple(f for f in RELEVANT_FLAGS if f in names)


@lru_cache(maxsize=None)
def _warn_if_claimed(flags: tuple[str, ...], real: tuple[str, ...]) -> None:
    # Once per value: cpu_info() is asked at every backend choice and cache lookup.
    claimed = [f for f in flags if f not in real]
    if claimed:
        logger.warning(
            "%s claims %s, which this CPU lacks: OpenVINO emulates such units (slower than FP32) or refuses the "
            "model; unset it, or name only flags this CPU has, to run at full speed.",
            ENV_VAR,
            ", ".join(claimed),
        )
