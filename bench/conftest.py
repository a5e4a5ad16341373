"""Models for the benchmarks: the embedded small glyffuser ("small"; the tiny fixture when
no embedded model is installed), the tiny fixture and the full-size configuration.

Random weights for the fixtures: speed does not depend on their values. Backends run on the
device named by `--bench-device` (default cpu), never on whatever happens to be present.
Everything goes through glyph-engine's public routes, as a user's script would: the export
through `glyph-engine export`, backends through `Session`.
"""

import subprocess
import sys

import pytest

from glyph_engine.checkpoint import load_model
from glyph_engine.model import GLYFFUSER_UNET_CONFIG, TEACHER_CHECKPOINT
from glyph_engine.session import ModelSource, Session

from factories import (
    T5_SMALL_CONFIG,
    TINY_T5_CONFIG,
    TINY_UNET_CONFIG,
    make_glyffuser_folder,
    make_text_encoder_folder,
)

SIZES = {"tiny": (TINY_UNET_CONFIG, TINY_T5_CONFIG), "full": (GLYFFUSER_UNET_CONFIG, T5_SMALL_CONFIG)}


def export(ckpt, text_encoder, out, precision: str) -> None:
    """`glyph-engine export` of the model in one precision, without TensorRT engines."""
    command = [sys.executable, "-m", "glyph_engine", "export", str(ckpt), "-o", str(out), "--precision", precision]
    command += ["--no-tensorrt", *(["--text-encoder", str(text_encoder)] if text_encoder else [])]
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory, bench_device):
    """bench_model(size) -> (model, export_dir), built once per size and session.

    ONNX Runtime runs the FP32 files on a CPU and the FP16 ones on a GPU: export what runs.
    """
    precision = "fp16" if bench_device.type == "cuda" else "fp32"
    built = {}

    def get(size: str):
        if size == "small" and not TEACHER_CHECKPOINT.is_file():
            size = "tiny"
        if size not in built:
            root = tmp_path_factory.mktemp(f"bench-{size}")
            if size == "small":
                ckpt, text_encoder = TEACHER_CHECKPOINT, None
            else:
                unet_config, t5_config = SIZES[size]
                ckpt = make_glyffuser_folder(root / "glyffuser", unet_config)
                text_encoder = make_text_encoder_folder(root / "t5", t5_config)
            out = root / "export"
            export(ckpt, text_encoder, out, precision)
            built[size] = (load_model(ckpt, None if text_encoder is None else str(text_encoder)), out)
        return built[size]

    return get


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="Device the benchmarked backends run on: cpu or cuda.")


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda needs a CUDA GPU; this machine has none")
    return device


@pytest.fixture(scope="session")
def bench_backend(bench_model, bench_device, tmp_path_factory):
    """bench_backend(size, name) -> a backend on the benchmark device, one per (size, name),
    opened as `generate --backend NAME` opens it (OpenVINO: compiled for this CPU on first use,
    at the precision auto picks)."""
    import torch

    cache = tmp_path_factory.mktemp("bench-cache")
    made = {}

    def get(size: str, name: str):
        if name == "openvino" and bench_device.type != "cpu":
            pytest.skip("OpenVINO runs on the CPU")
        if (size, name) not in made:
            model, export_dir = bench_model(size)
            source = ModelSource(backend=name, export_dir=export_dir, cache_dir=cache)
            with pytest.MonkeyPatch.context() as patch:
                if bench_device.type == "cpu":  # a GPU machine's GPU hidden: backends pick their device themselves
                    patch.setattr(torch.cuda, "is_available", lambda: False)
                made[size, name] = Session.load(source, model=model).backend
        return made[size, name]

    return get
