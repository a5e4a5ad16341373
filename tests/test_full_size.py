"""The full-size glyffuser configuration (about 131M U-Net parameters, 128x128)."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.cli import app
from glyph_engine.model import GLYFFUSER_UNET_CONFIG
from glyph_engine.testing import T5_SMALL_CONFIG, make_glyffuser_folder, make_text_encoder_folder


@pytest.mark.slow
def test_full_size_loads_and_generates(tmp_path):
    folder = make_glyffuser_folder(tmp_path / "glyffuser", GLYFFUSER_UNET_CONFIG)
    t5 = make_text_encoder_folder(tmp_path / "t5", T5_SMALL_CONFIG)
    runner = CliRunner()

    info = runner.invoke(app, ["info", str(folder), "--text-encoder", str(t5)])
    assert info.exit_code == 0, info.output
    params = float(info.output.split("UNet2DConditionModel, ")[1].split("M")[0])
    assert 125 < params < 135
    assert "128x128" in info.output

    out = tmp_path / "g.png"
    result = runner.invoke(
        app,
        ["generate", "metal", "-n", "1", "--steps", "2", "--guidance", "3",
         "--ckpt", str(folder), "--text-encoder", str(t5), "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (128 + 4, 128 + 4)  # one glyph and the grid's border
