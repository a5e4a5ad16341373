"""Models for the benchmarks: the embedded small glyffuser ("small"; the tiny fixture when
no embedded model is installed), the tiny fixture and the full-size configuration.

Random weights for the fixtures: speed does not depend on their values. Backends run on the
device named by `--bench-device` (default cpu), never on whatever happens to be present.
"""

import pytest

from glyph_engine.checkpoint import load_model
from glyph_engine.export.exporter import ExportOptions, export_model
from glyph_engine.model import DEFAULT_CHECKPOINT, GLYFFUSER_UNET_CONFIG

from factories import (
    T5_SMALL_CONFIG,
    TINY_T5_CONFIG,
    TINY_UNET_CONFIG,
    make_glyffuser_folder,
    make_text_encoder_folder,
)

SIZES = {"tiny": (TINY_UNET_CONFIG, TINY_T5_CONFIG), "full": (GLYFFUSER_UNET_CONFIG, T5_SMALL_CONFIG)}


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory, bench_device):
    """bench_model(size) -> (model, export_dir), built once per size and session.

    ONNX Runtime runs the FP32 files on a CPU and the FP16 ones on a GPU: export what runs.
    """
    precision = "fp16" if bench_device.type == "cuda" else "fp32"
    built = {}

    def get(size: str):
        if size == "small" and not DEFAULT_CHECKPOINT.is_file():
            size = "tiny"
        if size not in built:
            root = tmp_path_factory.mktemp(f"bench-{size}")
            if size == "small":
                model = load_model(DEFAULT_CHECKPOINT)
            else:
                unet_config, t5_config = SIZES[size]
                folder = make_glyffuser_folder(root / "glyffuser", unet_config)
                model = load_model(folder, str(make_text_encoder_folder(root / "t5", t5_config)))
            out = root / "export"
            export_model(model.sha256, lambda: model, out, ExportOptions(precisions=(precision,)))
            built[size] = (model, out)
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
    """bench_backend(size, name) -> a backend on the benchmark device, one per (size, name)."""
    from glyph_engine.backend_factory import create_backend
    from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
    from glyph_engine.cache import ArtifactCache

    cache_root = tmp_path_factory.mktemp("bench-cache")
    from glyph_engine.backends.pytorch import TorchBackend

    made = {}

    def get(size: str, name: str):
        if (size, name) not in made:
            model, export_dir = bench_model(size)
            if name == "torch":
                made[size, name] = TorchBackend(model, device=bench_device)
            elif name == "openvino":
                if bench_device.type != "cpu":
                    pytest.skip("OpenVINO runs on the CPU")
                # The CPU default: compiled for this CPU on first use, at the precision auto picks.
                made[size, name] = create_backend("openvino", model, cache=ArtifactCache(cache_root))
            else:
                made[size, name] = OnnxRuntimeBackend(model, export_dir, device=bench_device)
        return made[size, name]

    return get
