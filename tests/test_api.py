"""The Python API: the CLI's glyphs from a call, requests, threads, errors, the README example."""

import ast
import inspect
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import glyph_engine
from glyph_engine import api
from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.model import DEFAULT_CHECKPOINT

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def pipe(ckpt_path):
    return glyph_engine.load(ckpt_path, backend="torch")


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


@pytest.mark.parametrize("which", ["checkpoint", "diffusers-folder"])
def test_a_call_draws_what_generate_writes(which, pipe, ckpt_path, glyffuser_folder, t5_folder, tmp_path):
    grid_path, folder = tmp_path / "grid.png", tmp_path / "each"
    options = ["-n", 3, "--steps", 3, "--seed", 5, "--guidance", 6, "--backend", "torch", "--ckpt", ckpt_path]
    if which == "diffusers-folder":
        pipe = glyph_engine.load(glyffuser_folder, text_encoder=str(t5_folder), backend="torch")
        options[-1:] = [glyffuser_folder, "--text-encoder", t5_folder]
    result = CliRunner().invoke(
        app, ["generate", "metal", "water; river", *map(str, options), "-o", str(grid_path), "--out-dir", str(folder)]
    )
    assert result.exit_code == 0, result.output

    glyphs = pipe(["metal", "water; river"], n=3, steps=3, seed=5, guidance=6)
    assert len(glyphs) == 6 and glyphs.prompts == ("metal",) * 3 + ("water; river",) * 3
    with Image.open(grid_path) as written:
        assert np.array_equal(np.asarray(glyphs.grid()), np.asarray(written))
    for i, image in enumerate(glyphs.images):
        with Image.open(folder / f"{i:04d}.png") as written:
            assert np.array_equal(np.asarray(image), np.asarray(written))
            assert int(written.text["image_seed"]) == glyphs.seeds[i]
    saved = tmp_path / "saved.png"
    glyphs.save(saved)
    assert png_text(saved) == png_text(grid_path)  # the same settings, model, backend and step recorded
    with Image.open(io.BytesIO(glyphs._repr_png_())) as shown:
        assert np.array_equal(np.asarray(shown), np.asarray(glyphs.grid()))
    assert (pipe.backend, pipe.precision) == ("torch", "fp32") and glyphs.metadata["backend"] == "torch"


def test_requests_draw_each_as_a_call_alone(pipe):
    requests = [glyph_engine.Request("metal", 2, seed=1), glyph_engine.Request("fire", 3, seed=2)]
    together = pipe.requests(requests, steps=2)
    for got, request in zip(together, requests, strict=True):
        alone = pipe(request.prompt, n=request.count, seed=request.seed, steps=2)
        assert got.seeds == alone.seeds and got.prompts == alone.prompts
        assert np.abs(got.array.astype(int) - alone.array).max() <= 1  # one grey level: batch-size rounding
        assert got.metadata["seed"] == request.seed and got.metadata["prompts"] == [request.prompt]


def test_calls_from_several_threads_each_draw_their_own(ckpt_path):
    # OpenVINO: one infer request per compiled model, which two threads at once would share.
    pipe = glyph_engine.load(ckpt_path, backend="openvino", precision="fp32")
    expected = {seed: pipe("wood", n=2, seed=seed, steps=2).array for seed in range(4)}
    got = {}

    def draw(seed):
        got[seed] = pipe("wood", n=2, seed=seed, steps=2).array

    threads = [threading.Thread(target=draw, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[s], expected[s]) for s in expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p("", n=2), "a prompt is empty"),
        (lambda p: p("metal", n=0), "n must be from 1 to 4096"),
        (lambda p: p("metal", steps=0), "--steps must be at least 1"),
        (lambda p: p("metal", sampler="euler"), "euler"),
        (lambda p: p.requests([]), "no requests"),
        (lambda p: p.requests([glyph_engine.Request("metal", -1)]), "a request's count must be from 1"),
    ],
    ids=["empty-prompt", "n", "steps", "sampler", "no-requests", "count"],
)
def test_bad_calls_raise_the_clis_sentence(pipe, call, message):
    with pytest.raises(glyph_engine.GlyphEngineError, match=message):
        call(pipe)


def test_bad_loads_raise_the_clis_sentence(tmp_path):
    with pytest.raises(glyph_engine.GlyphEngineError, match="backend must be one of auto, torch"):
        glyph_engine.load(backend="cuda")
    with pytest.raises(glyph_engine.GlyphEngineError, match="does not exist"):
        glyph_engine.load(tmp_path / "missing.pt")


def test_all_lists_the_public_api_and_the_rest_is_private_by_name():
    assert sorted(glyph_engine.__all__) == sorted(
        ["GlyphEngineError", "Glyphs", "Pipeline", "Request", "load", "__version__"]
    )
    for name in glyph_engine.__all__:
        assert getattr(glyph_engine, name) is not None
    defined = {
        name
        for name, value in vars(api).items()
        if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == api.__name__
    }
    assert defined - set(api.__all__) == {n for n in defined if n.startswith("_")}
    with pytest.raises(AttributeError):
        glyph_engine.generate  # noqa: B018


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch):
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ast.parse(code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    with Image.open(tmp_path / "metal.png") as written:
        # The embedded default model at its own steps.
        assert written.size[0] > 32 and written.text["steps"] == str(load_model(DEFAULT_CHECKPOINT).default_steps)
