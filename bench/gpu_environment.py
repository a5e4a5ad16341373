"""make gpu-check, step 2 (environment.json): Python, torch and its CUDA, the GPU and its
clocks, nvcc, the CPU and the libraries, with what step 1 installed."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch.utils.cpp_extension import CUDA_HOME

from glyph_engine.cpu import cpu_info

LIBRARIES = (
    *("glyph-engine", "torch", "triton", "diffusers", "transformers", "onnx", "onnxruntime", "openvino"),
    *("numpy", "pillow", "sentencepiece", "ninja", "pytest", "pytest-benchmark"),
)


def command_output(command: list[str]) -> str | None:
    """What `command` prints; None when the program is not there."""
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        return None
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return (result.stdout or result.stderr).strip()


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(wheels: dict[str, Any]) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else "nvcc")
    cpu = cpu_info()
    clocks = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem"
    return {
        "passed": False if "errors" in wheels else None,  # a record, unless installing failed
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.mem_get_info()[1] / 2**30, 1) if cuda else None,
        "nvidia_smi": command_output(["nvidia-smi", f"--query-gpu={clocks}", "--format=csv"]),
        "nvcc": command_output([nvcc, "--version"]),
        "cpu": cpu.model,
        "cpu_cores": cpu.cores,
        "libraries": {name: installed_version(name) for name in LIBRARIES},
        "wheels": wheels,
    }
