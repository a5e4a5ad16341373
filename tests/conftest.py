"""Shared fixtures: a tiny glyffuser in the real formats, built once per test session.

Every test names its device: tests marked `gpu` run on CUDA; all others run on the CPU, so
the suite checks the same thing on a GPU machine as here. Tests that compare with an FP32
reference ask for FP32 (`--precision fp32`, or the torch backend); tests of the default
precision expect the one the CPU's flags give (bf16 with BF16 units), read here independently
of `glyph_engine.cpu`, and hold it to that precision's tolerance. `--cpu-kind` runs the suite
as on another of the project's CPUs (see CPU_KINDS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cpu_kinds import CPU_FLAGS_VAR, CPU_KINDS, KERNEL_CAPS
from factories import make_glyffuser_folder, make_text_encoder_folder


@pytest.fixture(scope="session")
def t5_folder(tmp_path_factory) -> Path:
    return make_text_encoder_folder(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def glyffuser_folder(tmp_path_factory) -> Path:
    return make_glyffuser_folder(tmp_path_factory.mktemp("glyffuser"))


@pytest.fixture(scope="session")
def ckpt_path(tmp_path_factory, glyffuser_folder, t5_folder) -> Path:
    from glyph_engine.checkpoint import convert_diffusers_folder

    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    convert_diffusers_folder(glyffuser_folder, path, str(t5_folder), default_guidance=4.0)
    return path


@pytest.fixture
def model(ckpt_path):
    """A freshly loaded model (tests may move or modify it)."""
    from glyph_engine.checkpoint import load_model

    return load_model(ckpt_path)


@pytest.fixture(scope="session", autouse=True)
def artifact_cache(tmp_path_factory) -> Path:
    """One artifact cache for the session (never the user's): compiled models built by one
    test are reused by the next, as they are between a user's runs."""
    from glyph_engine.cache import ENV_VAR

    folder = tmp_path_factory.mktemp("artifact-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, str(folder))
        yield folder


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Hides the GPU from unmarked tests: code that picks "cuda if available" (auto backends,
    the CLI) would otherwise run them in FP16 on a GPU against CPU FP32 tolerances."""
    if request.node.get_closest_marker("gpu") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def cpu_flags() -> set[str]:
    """The CPU flags glyph-engine should see: the forced kind's, else this CPU's own, read
    from /proc/cpuinfo here rather than through the code under test."""
    forced = os.environ.get(CPU_FLAGS_VAR)
    if forced is not None:
        return {f.strip() for f in forced.split(",") if f.strip()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@pytest.fixture(scope="session")
def default_precision(cpu_flags) -> str:
    """What `--precision auto` must choose on this CPU kind for a model with no int8 build."""
    return "bf16" if cpu_flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def pytest_addoption(parser):
    parser.addoption(
        "--quality-gate",
        action="store_true",
        help="Also run the eval-level quality gate on the embedded model (tens of minutes on 2 cores).",
    )
    parser.addoption(
        "--cpu-kind",
        choices=sorted(CPU_KINDS),
        help="Run as on that kind of CPU: glyph-engine sees only its flags ($GLYPH_ENGINE_CPU_FLAGS) and "
        "PyTorch's and OpenVINO's kernels are capped at its instructions ($ONEDNN_MAX_CPU_ISA, "
        "$ATEN_CPU_CAPABILITY); subprocesses inherit both. Default: this CPU's own flags and kernels.",
    )


def pytest_configure(config):
    kind = config.getoption("--cpu-kind")
    if kind is not None:
        # Before any kernel runs: both libraries read their cap once, at their first kernel.
        os.environ.update({CPU_FLAGS_VAR: CPU_KINDS[kind], **KERNEL_CAPS[kind]})


def pytest_report_header(config):
    forced = os.environ.get(CPU_FLAGS_VAR)
    kind = config.getoption("--cpu-kind") or ("forced" if forced is not None else "this CPU's own flags")
    names = {name for caps in KERNEL_CAPS.values() for name in caps}
    caps = ", ".join(f"{k}={v}" for k, v in os.environ.items() if k in names)
    header = f"cpu kind: {kind}" + (f" ({CPU_FLAGS_VAR}={forced})" if forced is not None else "")
    return header + (f"; kernels capped: {caps}" if caps else "")


def pytest_collection_modifyitems(config, items):
    import torch

    from glyph_engine.backends.tensorrt import load_tensorrt

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    if load_tensorrt() is None:
        skips["tensorrt"] = pytest.mark.skip(reason="needs TensorRT: pip install 'glyph-engine[tensorrt-rtx]'")
    if find_nvcc() is None:
        skips["nvcc"] = pytest.mark.skip(reason="needs CUDA's nvcc (not on PATH, CUDA_HOME or /usr/local/cuda)")
    if not config.getoption("--quality-gate"):
        skips["quality_gate"] = pytest.mark.skip(reason="eval-level quality gate: run with --quality-gate")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def find_nvcc() -> str | None:
    import os
    import shutil

    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@pytest.fixture
def nvcc() -> str:
    return find_nvcc()
