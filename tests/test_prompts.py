"""Prompts the tokenizer cannot take are refused in one line, before any model loads."""

import pytest
from typer.testing import CliRunner

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
    ],
    ids=["not-utf8", "empty", "blank"],
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
