"""The glyph training set: Unihan parsing, definition cleaning, rendering, storage."""

import bz2

import numpy as np
import pytest
from typer.testing import CliRunner

from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.training.dataset import (
    DEFAULT_FONT,
    UNIHAN_DIR,
    _entries,
    build_glyph_set,
    clean_definition,
    load_glyph_set,
    radical_number,
    read_unihan,
    save_glyph_set,
)

needs_debian_data = pytest.mark.skipif(
    not (UNIHAN_DIR / "Unihan_Readings.txt.bz2").is_file() or not DEFAULT_FONT.is_file(),
    reason="needs Debian's unicode-data and fonts-noto-cjk (make install-test installs them as root)",
)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("(same as U+4E18 丘) hillock or mound", "hillock or mound"),
        ("to lick; to taste, a mat, bamboo bark", "to lick; to taste, a mat, bamboo bark"),
        ("metal; gold (cf. 鈤); money", "metal; gold; money"),
        ("(Cant.) to scoop up", "(Cant.) to scoop up"),
        ("variant of 丘", None),
        ("café owner", None),
    ],
)
def test_clean_definition(raw, clean):
    assert clean_definition(raw) == clean


@pytest.mark.parametrize("value, radical", [("167.3", 167), ("167'.3", 167), ("85.5 85.4", 85), ("1.0", 1)])
def test_radical_number(value, radical):
    assert radical_number(value) == radical


def test_read_unihan(tmp_path):
    path = tmp_path / "Unihan_Readings.txt.bz2"
    text = "# comment\nU+3400\tkDefinition\thillock\nU+3400\tkMandarin\tqiū\nU+9FFF\tkDefinition\tlast\n"
    path.write_bytes(bz2.compress(text.encode()))
    assert read_unihan(path, "kDefinition") == {0x3400: "hillock", 0x9FFF: "last"}


@needs_debian_data
def test_the_real_data_has_about_twenty_thousand_pairs():
    entries = list(_entries(UNIHAN_DIR, None))
    assert 20_000 <= len(entries) <= 21_500  # the original kept 20,607
    codes = [code for code, _, _ in entries]
    assert min(codes) >= 0x3400 and max(codes) <= 0x9FFF
    assert all(1 <= radical <= 214 for _, _, radical in entries)


@needs_debian_data
def test_build_small_subset(tmp_path):
    glyphs = build_glyph_set(resolution=32, limit=64)
    assert glyphs.images.shape == (64, 32, 32) and glyphs.images.dtype == np.uint8
    ink = glyphs.images < 128
    assert ink.any(axis=(1, 2)).all()  # every glyph has ink
    for glyph in ink:
        rows, cols = np.flatnonzero(glyph.any(axis=1)), np.flatnonzero(glyph.any(axis=0))
        assert rows[0] > 0 and rows[-1] < 31 and cols[0] > 0 and cols[-1] < 31  # not clipped
        assert abs(rows[0] + rows[-1] - 31) <= 2 and abs(cols[0] + cols[-1] - 31) <= 2  # ink box centred
    assert glyphs.images[:, 0, :].min() == 255  # white border
    path = tmp_path / "glyphs.npz"
    save_glyph_set(glyphs, path)
    again = load_glyph_set(path)
    assert np.array_equal(again.images, glyphs.images) and list(again.captions) == list(glyphs.captions)


@needs_debian_data
def test_dataset_cli(tmp_path):
    out = tmp_path / "g.npz"
    result = CliRunner().invoke(app, ["dataset", "-o", str(out), "--resolution", "24", "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert "10 glyphs of 24x24" in result.output
    assert load_glyph_set(out).images.shape == (10, 24, 24)


def test_missing_inputs_name_the_package(tmp_path):
    with pytest.raises(GlyphEngineError, match="fonts-noto-cjk|check --font"):
        build_glyph_set(font_path=tmp_path / "none.ttc")
    if DEFAULT_FONT.is_file():
        with pytest.raises(GlyphEngineError, match="unicode-data"):
            build_glyph_set(unihan_dir=tmp_path)
    with pytest.raises(GlyphEngineError, match="glyph-engine dataset"):
        load_glyph_set(tmp_path / "missing.npz")


def glyph_arrays(n=4, size=8):
    return {
        "images": np.full((n, size, size), 255, np.uint8),
        "captions": np.array([f"metal {i}" for i in range(n)]),
        "codepoints": np.arange(n, dtype=np.int32) + 0x4E00,
        "radicals": np.full(n, 167, np.int16),
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, None),
        ({"images": np.full((4, 8, 6), 255, np.uint8)}, "square uint8"),
        ({"images": np.full((4, 8, 8), 1.0, np.float32)}, "square uint8"),
        ({"captions": np.array(["metal"] * 3)}, "one per image"),
        ({"radicals": np.full(4, 999, np.int16)}, "1 to 214"),
        ({"radicals": np.array(["167"] * 4)}, "whole numbers"),
    ],
    ids=["intact", "not-square", "float", "short-captions", "radical-999", "text-radicals"],
)
def test_inconsistent_datasets_are_refused(tmp_path, changes, message):
    path = tmp_path / "g.npz"
    np.savez_compressed(path, **{**glyph_arrays(), **changes})
    if message is None:
        assert len(load_glyph_set(path)) == 4
        return
    with pytest.raises(GlyphEngineError, match=message):
        load_glyph_set(path)


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 not really a zip"], ids=["empty", "bad-zip"])
def test_unreadable_dataset_files_are_refused(tmp_path, data):
    path = tmp_path / "g.npz"
    path.write_bytes(data)
    with pytest.raises(GlyphEngineError, match="is not a glyph dataset"):
        load_glyph_set(path)
