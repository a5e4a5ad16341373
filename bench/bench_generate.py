"""End-to-end generation throughput on the PyTorch backend (tiny glyffuser-format model)."""

import pytest

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.checkpoint import load_model
from glyph_engine.pipeline import GenerationSettings, generate
from glyph_engine.testing import make_glyffuser_folder, make_text_encoder_folder

BATCH = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = load_model(make_glyffuser_folder(root / "glyffuser"), str(make_text_encoder_folder(root / "t5")))
    return model, TorchBackend(model)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20])
def test_generate_torch(benchmark, tiny, steps):
    model, backend = tiny
    settings = GenerationSettings(steps=steps, guidance=4.0)
    benchmark.group = "generate: torch, tiny model, 16 images, guidance 4"
    benchmark.extra_info["images_per_call"] = BATCH
    benchmark.pedantic(
        generate, args=(model, backend, ["metal"], BATCH, settings), rounds=3, warmup_rounds=1, iterations=1
    )
