"""The full-size glyffuser configuration (about 131M U-Net parameters, 128x128).

Random weights in the real formats; marked `slow` (a few minutes on 2 CPU cores).
"""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.backends.tensorrt import load_tensorrt
from glyph_engine.cli import app
from glyph_engine.export_manifest import read_manifest
from glyph_engine.model import GLYFFUSER_UNET_CONFIG

from factories import T5_SMALL_CONFIG, make_glyffuser_folder, make_text_encoder_folder

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return make_glyffuser_folder(root / "glyffuser", GLYFFUSER_UNET_CONFIG), make_text_encoder_folder(
        root / "t5", T5_SMALL_CONFIG
    )


def test_full_size_loads_and_generates(full_size, tmp_path):
    folder, t5 = full_size
    info = runner.invoke(app, ["info", str(folder), "--text-encoder", str(t5)])
    assert info.exit_code == 0, info.output
    params = float(info.output.split("UNet2DConditionModel, ")[1].split("M")[0])
    assert 125 < params < 135
    assert "128x128" in info.output

    out = tmp_path / "g.png"
    result = runner.invoke(
        app,
        ["generate", "metal", "-n", "1", "--steps", "2", "--guidance", "3", "--backend", "torch",
         "--ckpt", str(folder), "--text-encoder", str(t5), "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (128 + 4, 128 + 4)  # one glyph and the grid's border


def test_full_size_exports_validates_and_builds_engines(full_size, tmp_path):
    folder, t5 = full_size
    out = tmp_path / "export"
    trt = load_tensorrt()
    engines = ["--compute-capability", "8.6"] if trt is not None and trt.ahead_of_time else []
    result = runner.invoke(app, ["export", str(folder), "--text-encoder", str(t5), "-o", str(out), *engines])
    assert result.exit_code == 0, result.output
    print(result.output)  # the validation table, for the record (pytest -s)
    lines = {tuple(line.split()[:2]): line for line in result.output.splitlines() if "max abs error" in line}
    assert set(lines) == {(c, p) for c in ("unet", "text_encoder") for p in ("fp32", "fp16")}
    for (_, precision), line in lines.items():
        max_abs = float(line.split("max abs error")[1].split()[0])
        cosine = float(line.split("cosine")[1].split()[0])
        assert cosine >= (0.99999 if precision == "fp32" else 0.999)
        if precision == "fp32":
            assert max_abs < 1e-4
    assert (out / "unet.fp16.onnx").stat().st_size < 0.6 * (out / "unet.fp32.onnx").stat().st_size
    if engines:
        unet = read_manifest(out)["tensorrt"]["sm86"]["engines"]["unet"]
        assert unet["layer_precisions"] == {"CONVOLUTION:HALF": 78, "MATRIX_MULTIPLY:HALF": 113}
        assert unet["bytes"] > 200 * 2**20  # 131M FP16 weights
