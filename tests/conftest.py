"""Shared fixtures: a tiny glyffuser in the real formats, built once per test session.

Every test names its device: tests marked `gpu` run on CUDA; all others run on the CPU in
FP32 on every machine, so the suite checks the same thing on a GPU machine as here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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


def pytest_addoption(parser):
    parser.addoption(
        "--quality-gate",
        action="store_true",
        help="Also run the eval-level quality gate on the embedded model (tens of minutes on 2 cores).",
    )


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
