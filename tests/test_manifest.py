"""The bulk manifest reader on untrusted lines (property-based).

On a resume, `finished` decides which glyphs are already drawn from `manifest.jsonl`, which
anyone may have edited. Whatever the lines say (random JSON, junk bytes, lines cut short,
paths such as ../x or absolute ones, other glyphs' files and hashes, fields of the wrong
type), a glyph counts as done only if a line is exactly the one the job writes for it and
its own file in --out-dir holds those bytes; and nothing but GlyphEngineError is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from glyph_engine.bulk import MANIFEST, finished, plan
from glyph_engine.errors import GlyphEngineError

PROMPTS = ["metal", "water"]
GLYPHS = plan(PROMPTS, 3, seed=3)
HEADER = {"format": 1, "model_sha256": "0" * 64, "prompts": len(PROMPTS), "num_images": 3}
HEADER_LINE = json.dumps({"job": HEADER}).encode()
FILE_STATES = ["missing", "intact", "another glyph's bytes", "empty", "folder", "fifo"]
DELETED = object()
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def content(index: int) -> bytes:
    return f"the PNG of glyph {index}".encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


RIGHT = [glyph.record(sha256(content(glyph.index))) for glyph in GLYPHS]


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """Every glyph's bytes under its own name, outside the --out-dir: lines may point here."""
    folder = tmp_path_factory.mktemp("outside")
    for glyph in GLYPHS:
        (folder / glyph.file).write_bytes(content(glyph.index))
    return folder


def lines_of(outside: Path) -> st.SearchStrategy[bytes]:
    files = [glyph.file for glyph in GLYPHS]
    paths = [*files, *(f"../outside/{f}" for f in files), *(str(outside / f) for f in files)]
    paths += [f"./{files[0]}", f"{files[0]}/", f"out/{files[0]}", "/dev/null", "", ".", "..", files[0].upper()]
    values = st.one_of(
        st.sampled_from(paths),
        st.sampled_from([line["sha256"] for line in RIGHT] + [sha256(b"")]),
        st.sampled_from([*PROMPTS, "metal ", "Metal", "metal\x00"]),
        st.sampled_from([glyph.seed for glyph in GLYPHS] + [2**64, -1]),
        st.integers(-2, len(GLYPHS) + 2),
        st.floats(),
        st.booleans(),
        st.none(),
        st.text(max_size=10),
        st.lists(st.integers(0, len(GLYPHS)), max_size=2),
    )
    keys = list(RIGHT[0])

    def changed(line: dict, key: str, value: object) -> dict:
        line = dict(line)
        if value is DELETED:
            line.pop(key, None)
        else:
            line[key] = value
        return line

    right = st.sampled_from(RIGHT)
    edited = st.builds(changed, right, st.sampled_from([*keys, "extra"]), values | st.just(DELETED))
    twice_edited = st.builds(changed, edited, st.sampled_from(keys), values)
    objects = st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=8)
    json_values = st.one_of(right, edited, twice_edited, objects, values, st.lists(values, max_size=3))
    as_json = json_values.map(lambda value: json.dumps(value).encode())
    return st.one_of(
        as_json,
        as_json.map(lambda line: line[: len(line) // 2]),  # cut short by a kill
        st.binary(max_size=60).map(lambda raw: raw.replace(b"\n", b"")),
        st.text(max_size=30).map(lambda text: text.replace("\n", "").encode()),
    )


def lay_out(root: Path, states: list[str]) -> Path:
    """The --out-dir `root`/out with each glyph's file as `states` says, and intact copies beside it."""
    (root / "outside").mkdir()
    out = root / "out"
    out.mkdir()
    for glyph, state in zip(GLYPHS, states, strict=True):
        path = out / glyph.file
        if state == "intact":
            path.write_bytes(content(glyph.index))
        elif state == "another glyph's bytes":
            path.write_bytes(content((glyph.index + 1) % len(GLYPHS)))
        elif state == "empty":
            path.write_bytes(b"")
        elif state == "folder":
            path.mkdir()
        elif state == "fifo":
            os.mkfifo(path)  # reading it would hang the resume
        (root / "outside" / glyph.file).write_bytes(content(glyph.index))
    return out


def exactly_right(raw: bytes, index: int) -> bool:
    """The line, read as JSON and written back canonically, is the job's line for `index`."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        return False
    return json.dumps(value, sort_keys=True) == json.dumps(RIGHT[index], sort_keys=True)


@SETTINGS
@given(data=st.data(), states=st.lists(st.sampled_from(FILE_STATES), min_size=len(GLYPHS), max_size=len(GLYPHS)))
def test_only_an_exact_line_for_an_intact_own_file_counts(outside, data, states):
    lines = data.draw(st.lists(lines_of(outside), max_size=12), label="lines")
    with tempfile.TemporaryDirectory() as root:
        out = lay_out(Path(root), states)
        (out / MANIFEST).write_bytes(b"\n".join([HEADER_LINE, *lines]) + b"\n")
        done = finished(out, HEADER, GLYPHS)
    expected = {
        glyph.index
        for glyph in GLYPHS
        if states[glyph.index] == "intact" and any(exactly_right(raw, glyph.index) for raw in lines)
    }
    assert set(done) == expected
    assert all(done[index] == RIGHT[index] for index in done)


@SETTINGS
@given(
    first=st.one_of(
        st.binary(max_size=80),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)).map(json.dumps).map(str.encode),
        st.builds(
            lambda key, value: json.dumps({"job": {**HEADER, key: value}}).encode(),
            st.sampled_from([*HEADER, "extra"]),
            st.integers() | st.floats() | st.booleans() | st.text(max_size=5) | st.none(),
        ),
        st.integers(0, len(HEADER_LINE) - 1).map(lambda n: HEADER_LINE[:n]),  # cut short
    )
)
@example(first=json.dumps({"job": {**HEADER, "format": True}}).encode())  # true == 1 to Python
@example(first=json.dumps({"job": {**HEADER, "prompts": 2.0}}).encode())
def test_any_other_first_line_is_refused_with_a_sentence(first):
    first = first.replace(b"\n", b"")
    assume(first != HEADER_LINE)
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / MANIFEST).write_bytes(first + b"\n" + json.dumps(RIGHT[0]).encode() + b"\n")
        with pytest.raises(GlyphEngineError, match="damaged|another job"):
            finished(Path(root), HEADER, GLYPHS)


def test_lines_naming_other_files_are_not_trusted(outside, tmp_path):
    """The issue's cases: a glyph's own file is gone, and its line names the same bytes elsewhere."""
    out = lay_out(tmp_path, ["missing", "missing", "missing", "missing", "intact", "missing"])
    lines = [
        {**RIGHT[1], "file": f"../outside/{GLYPHS[1].file}"},
        {**RIGHT[2], "file": str(outside / GLYPHS[2].file)},
        {**RIGHT[3], "file": GLYPHS[4].file, "sha256": RIGHT[4]["sha256"]},  # another glyph's file
    ]
    (out / MANIFEST).write_bytes(b"\n".join([HEADER_LINE, *(json.dumps(line).encode() for line in lines)]))
    assert finished(out, HEADER, GLYPHS) == {}
    (out / MANIFEST).write_bytes(HEADER_LINE + b"\n" + json.dumps(RIGHT[4]).encode())
    assert finished(out, HEADER, GLYPHS) == {4: RIGHT[4]}  # while the right line counts
