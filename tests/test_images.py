import io
import json
import unicodedata

import numpy as np
import pytest
from PIL import Image

from glyph_engine.images import grid, png_bytes


@pytest.mark.parametrize(
    ("per_prompt", "cols", "rows"),
    [(8, 4, 2), (64, 8, 8), (7, 3, 3), (1, 1, 1)],
)
def test_grid_places_each_prompt_block(per_prompt, cols, rows):
    prompts, size, pad = 2, 4, 2
    # Image i is filled with the value i, so every tile says which image landed there.
    pixels = np.repeat(np.arange(prompts * per_prompt, dtype=np.uint8), size * size).reshape(-1, size, size)
    out = grid(pixels, per_prompt, pad=pad)
    assert out.shape == ((size + pad) * rows * prompts + pad, (size + pad) * cols + pad)
    for i in range(prompts * per_prompt):
        block, k = divmod(i, per_prompt)
        r, c = block * rows + k // cols, k % cols
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        assert (out[y : y + size, x : x + size] == i).all()
    # Everything outside the tiles is the white background.
    assert (out == 255).sum() == out.size - prompts * per_prompt * size * size


def test_png_metadata_carries_no_control_characters():
    prompt = "metal\x00\x1b[31mred\x7f\x9b\tend"
    png = png_bytes(np.zeros((4, 4), np.uint8), {"prompt": prompt, "prompts": [prompt, "水"]})
    text = Image.open(io.BytesIO(png)).text
    assert text["prompt"] == "metal\\u0000\\u001b[31mred\\u007f\\u009b\\u0009end"
    assert json.loads(text["prompts"]) == [prompt, "水"]  # inside JSON strings the escapes are lossless
    assert not any(unicodedata.category(c) == "Cc" for value in text.values() for c in value)
