"""Models for the benchmarks: the embedded small glyffuser ("small"; the tiny fixture when
no embedded model is installed), the tiny fixture and the full-size configuration.

Random weights for the fixtures: speed does not depend on their values.
"""

import pytest

from glyph_engine.checkpoint import load_model
from glyph_engine.export.exporter import ExportOptions, export_model
from glyph_engine.model import DEFAULT_CHECKPOINT, GLYFFUSER_UNET_CONFIG
from glyph_engine.testing import (
    T5_SMALL_CONFIG,
    TINY_T5_CONFIG,
    TINY_UNET_CONFIG,
    make_glyffuser_folder,
    make_text_encoder_folder,
)

SIZES = {"tiny": (TINY_UNET_CONFIG, TINY_T5_CONFIG), "full": (GLYFFUSER_UNET_CONFIG, T5_SMALL_CONFIG)}


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory):
    """bench_model(size) -> (model, export_dir), built once per size and session."""
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
            export_model(model.sha256, lambda: model, out, ExportOptions(precisions=("fp32",)))
            built[size] = (model, out)
        return built[size]

    return get
