"""Which U-Net precisions each backend runs, and what `--precision auto` means: decided once
per device (`cpu_auto`, `gpu_auto`), so every backend on a device takes the same choice.

A backend runs a precision it accepts as asked and refuses any other in one line that says
where that precision does run (`choose`); the precision it reports is the one that ran.
"""

from __future__ import annotations

from collections.abc import Collection

from glyph_engine.cpu import CpuInfo, cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision

# The U-Net precisions each backend runs, by device type (T5 runs FP32, or the export's
# mixed FP16 file on ONNX Runtime and TensorRT GPUs). CPUs get no FP16: they have no fast
# half math. ONNX Runtime runs the precisions its export folder holds among these.
RUNS: dict[str, dict[str, tuple[Precision, ...]]] = {
    "torch": {"cpu": (Precision.fp32,), "cuda": (Precision.fp32, Precision.fp16)},
    "onnxruntime": {"cpu": (Precision.fp32,), "cuda": (Precision.fp32, Precision.fp16)},
    "openvino": {"cpu": (Precision.fp32, Precision.bf16, Precision.int8)},
    "inductor": {"cpu": (Precision.fp32, Precision.bf16)},
    "tensorrt": {"cuda": (Precision.fp16,)},
}
_WHY = {"tensorrt": " (its engines are built from the FP16 ONNX files)"}
_WHERE = {"cpu": "a CPU", "cuda": "a GPU"}


def cpu_auto(candidates: Collection[Precision], int8_passed: bool, cpu: CpuInfo) -> Precision:
    """`auto` on a CPU: int8 where an int8 build of the model passed the quality gate here and
    the CPU has int8 units (VNNI or AMX), else bf16 where it has BF16 units (AVX-512 BF16 or
    AMX), else fp32; each only where it is among `candidates` (what the backend runs here)."""
    if Precision.int8 in candidates and int8_passed and cpu.has_int8:
        return Precision.int8
    if Precision.bf16 in candidates and cpu.has_bf16:
        return Precision.bf16
    return Precision.fp32


def gpu_auto(candidates: Collection[Precision]) -> Precision:
    """`auto` on a GPU: fp16 (tensor cores, half the memory traffic) where the backend runs it."""
    return Precision.fp16 if Precision.fp16 in candidates else Precision.fp32


def choose(
    backend: str,
    device: str,
    requested: Precision | str,
    available: Collection[Precision] | None = None,
    int8_passed: bool = False,
) -> Precision:
    """The precision `backend` runs on `device` ("cpu" or "cuda") when asked for `requested`.

    `available` narrows what auto may take to what this backend has at hand (an export's
    files); a precision asked for by name is returned even if it is not there, so the backend
    can say what to rebuild. `int8_passed`: an int8 build of the model passed its gate here.
    """
    requested = Precision(requested)
    if device not in RUNS[backend]:
        where = _either([_WHERE[d] for d in RUNS[backend]])
        raise GlyphEngineError(f"--backend {backend} does not run on {_WHERE.get(device, device)}; it runs on {where}.")
    runs = RUNS[backend][device]
    if requested is Precision.auto:
        candidates = [p for p in runs if available is None or p in available]
        return cpu_auto(candidates, int8_passed, cpu_info()) if device == "cpu" else gpu_auto(candidates)
    if requested not in runs:
        raise GlyphEngineError(_refusal(backend, device, requested))
    return requested


def _refusal(backend: str, device: str, precision: Precision) -> str:
    runs = _either([p.value for p in RUNS[backend][device]])
    elsewhere = [(b, d) for b, by_device in RUNS.items() for d, ps in by_device.items() if precision in ps]
    backends = list(dict.fromkeys(f"--backend {b}" for b, _ in elsewhere))
    devices = {d for _, d in elsewhere}
    where = f" on {_WHERE[devices.pop()]}" if len(devices) == 1 else ""
    return (
        f"--backend {backend} on {_WHERE[device]} runs --precision {runs}{_WHY.get(backend, '')}, "
        f"not {precision.value}; {precision.value} runs{where} with {_either(backends)}."
    )


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
