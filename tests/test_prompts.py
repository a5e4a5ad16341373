"""Prompts the tokenizer cannot take are refused in one line, before any model loads."""

import json

import pytest
from typer.testing import CliRunner

from glyph_engine.bulk import MANIFEST, read_prompts
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.text import check_prompts


@pytest.mark.parametrize(
    "prompt, message",
    [
        # What Python makes of the bytes of $'\xff\xfe metal' on the command line (surrogateescape).
        (b"\xff\xfe metal".decode("utf-8", "surrogateescape"), "is not valid UTF-8 text"),
        ("", "prompt is empty"),
        ("   ", "prompt is empty"),
        ("\x00\x01", "has no printable character"),
        ("\x1b\x07 \u200b", "has no printable character"),  # ESC, BEL, a space, a zero-width space
    ],
    ids=["not-utf8", "empty", "blank", "nul", "controls-and-format"],
)
def test_generate_refuses_the_prompt(ckpt_path, tmp_path, prompt, message):
    out = tmp_path / "g.png"
    result = CliRunner().invoke(app, ["generate", prompt, "--ckpt", str(ckpt_path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_message_shows_the_bad_bytes():
    with pytest.raises(GlyphEngineError, match=r"prompt b'\\xff\\xfe metal' is not valid UTF-8"):
        check_prompts([b"\xff\xfe metal".decode("utf-8", "surrogateescape")])
    check_prompts(["metal", "木 wood; tree", "café"])  # any real Unicode text is fine


@pytest.mark.parametrize("prompt", ["\x00\x01", "\x1b", "\x7f\x9b", "\u200b\ufeff", "\x00 \x00"])
def test_prompts_with_nothing_printable_are_refused(prompt):
    with pytest.raises(GlyphEngineError, match=r"prompt .* has no printable character; give each prompt some"):
        check_prompts(["metal", prompt])
    check_prompts(["metal\x00", " 水 ", "\u200bfire"])  # some visible text is enough


def test_a_prompts_file_reads_as_people_type_it(tmp_path):
    path = tmp_path / "prompts.txt"
    # A BOM, Windows line ends, and inside one line a form feed and U+2028 (editors show no break there).
    path.write_bytes("\ufeffmetal\r\nwater\x0cfire\u2028wood\r\n\r\n  earth \n".encode())
    assert read_prompts(path) == ["metal", "water\x0cfire\u2028wood", "earth"]


def test_a_bulk_prompts_file_with_a_bom_draws_the_prompt_itself(ckpt_path, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffmetal\r\n".encode())
    args = ["generate", "--ckpt", str(ckpt_path), "--prompts-file", str(path), "-n", "1", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    _, line = (tmp_path / "out" / MANIFEST).read_text().splitlines()
    assert json.loads(line)["prompt"] == "metal"


def test_a_bulk_prompts_file_with_a_control_only_line_is_refused_in_one_line(ckpt_path, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("metal\n\x00\x01\nwater\n")
    args = ["generate", "--ckpt", str(ckpt_path), "--prompts-file", str(path), "-n", "1", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "has no printable character" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
