"""A warm start does only what drawing needs: no diffusers, no transformers, and a tokenizer
that is transformers' own, driven through the `tokenizers` library alone."""

from __future__ import annotations

import contextlib
import gc
import io
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.checkpoint import load_model, tokenizer_from_files
from glyph_engine.model import DEFAULT_CHECKPOINT
from glyph_engine.text import PromptTokenizer

from factories import DEFINITIONS, warm_generate_imports

PROMPTS = [
    "metal",
    "a kind of fish; water",
    "",
    "Ünïcödé — 金 and emoji 🐟",
    "  spaces   around  ",
    " ".join(["river"] * 300),  # beyond max_length: truncated
    "<pad> </s> <extra_id_3> as text",
]


def hugging_face_tokens(tokenizer, prompts, max_length):
    tokens = tokenizer(list(prompts), padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("source", ["checkpoint", "diffusers-folder", "embedded"])
@pytest.mark.parametrize("max_length", [256, 8])
def test_prompt_tokenizer_equals_the_hugging_face_tokenizer(source, max_length, ckpt_path, glyffuser_folder, t5_folder):
    path = {"checkpoint": ckpt_path, "diffusers-folder": glyffuser_folder, "embedded": DEFAULT_CHECKPOINT}[source]
    model = load_model(path, str(t5_folder) if source == "diffusers-folder" else None)
    model.max_text_length = max_length
    model.prompt_tokenizer_source = None  # rebuilt at this length, from the checkpoint's own if it has one
    if source != "diffusers-folder":
        payload = torch.load(path, weights_only=True)
        model.prompt_tokenizer_source = PromptTokenizer.from_files(payload["tokenizer"]["files"], max_length)
        assert model.prompt_tokenizer_source is not None  # the fast path, not built from transformers
    for prompts in (PROMPTS, PROMPTS[:2], PROMPTS[5:6]):
        ids, mask = model.prompt_tokenizer(prompts)
        want_ids, want_mask = hugging_face_tokens(model.tokenizer, prompts, max_length)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), prompts
    assert model.prompt_tokenizer.pad_id == model.tokenizer.pad_token_id
    assert model.prompt_tokenizer.vocab_size == len(model.tokenizer)


def test_a_checkpoint_loads_without_transformers_until_asked(ckpt_path):
    model = load_model(ckpt_path)
    assert callable(model.tokenizer_source) and model.prompt_tokenizer_source is not None
    ids, _ = model.prompt_tokenizer(["metal"])
    assert ids.shape[0] == 1
    assert model.tokenizer("metal")["input_ids"] == ids[0].tolist()  # built on first use


def test_stored_files_without_tokenizer_json_go_through_transformers_once(monkeypatch, tmp_path, ckpt_path):
    """A slow tokenizer's files (a sentencepiece model, no tokenizer.json): the engine's
    tokenizer is made from the Hugging Face one transformers builds from them, built once."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEFINITIONS * 10), model_writer=model, vocab_size=120, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    files = {"spiece.model": model.getvalue(), "tokenizer_config.json": b'{"tokenizer_class": "T5Tokenizer"}'}
    assert PromptTokenizer.from_files(files, 16) is None
    want = hugging_face_tokens(tokenizer_from_files(files, "test"), PROMPTS, 16)

    import transformers

    # Through the loader, as a checkpoint with such files is used: the engine's tokenizer
    # and the Hugging Face one are the same build.
    payload = torch.load(ckpt_path, weights_only=True)
    payload["tokenizer"]["files"] = files
    payload["tokenizer"]["max_length"] = 16
    torch.save(payload, tmp_path / "slow-tokenizer.pt")
    builds = []
    real = transformers.AutoTokenizer.from_pretrained
    counted = lambda *a, **k: builds.append(a) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted)
    loaded = load_model(tmp_path / "slow-tokenizer.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.prompt_tokenizer(PROMPTS), want, strict=True))
    assert loaded.tokenizer("metal")["input_ids"] == tokenizer_from_files(files, "test")("metal")["input_ids"]
    assert len(builds) == 2  # one for the model (both tokenizers), one for the line above


def test_a_warm_generate_imports_neither_diffusers_nor_transformers(tmp_path):
    modules = warm_generate_imports([], tmp_path)
    assert {"glyph_engine.pipeline", "torch", "tokenizers"} <= modules  # the report was read
    top_level = {m.split(".")[0] for m in modules}
    # pydantic: typer 0.29 and later parse options through it (pyproject pins typer below).
    unwanted = {"diffusers", "transformers", "pydantic"}
    assert not top_level & unwanted, sorted(m for m in modules if m.split(".")[0] in unwanted)


def test_the_fixed_cost_measurement_says_which_run_failed(tmp_path):
    from glyph_engine.errors import GlyphEngineError
    from glyph_engine.startup import measure_startup

    with pytest.raises(
        GlyphEngineError,
        match="timed run `python.* -m glyph_engine generate .* failed: error: checkpoint .* does not exist",
    ):
        measure_startup(["--ckpt", str(tmp_path / "missing.pt")], repeats=1)


def test_the_command_line_skips_the_last_garbage_collection(monkeypatch):
    """`main` freezes the objects left at exit (0.3-0.4 s of a warm start after importing
    torch), whether the command succeeded or not."""
    from glyph_engine.cli import main

    for argv, code in ((["glyph-engine", "version"], 0), (["glyph-engine", "no-such-command"], 2)):
        monkeypatch.setattr(sys, "argv", argv)
        try:
            with pytest.raises(SystemExit) as exit_:
                main()
            assert exit_.value.code == code
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()


def test_generate_ends_without_the_interpreters_teardown_once_its_files_are_written(tmp_path, ckpt_path):
    """A finished `generate` ends at once: exit handlers run and its output is flushed, the
    glyphs are complete on disk, and the teardown (objects freed module by module, 0.14 s of
    a warm run) is skipped. A failed one exits as before, with its message and code 2."""
    script = f"""
import atexit, sys, threading
from pathlib import Path
folder = Path({str(tmp_path)!r})
atexit.register(lambda: (folder / "exit-handler-ran").touch())

def on_shutdown():  # the interpreter's shutdown waits for this thread, once the main one ends
    threading.main_thread().join()
    (folder / "teardown-ran").touch()

threading.Thread(target=on_shutdown).start()
sys.argv = ["glyph-engine", "generate", "metal", "-n", "2", "--steps", "2", "--backend", "torch", *sys.argv[1:]]
from glyph_engine.cli import main
main()
"""
    png = tmp_path / "g.png"
    ok = subprocess.run(
        [sys.executable, "-c", script, "--ckpt", str(ckpt_path), "-o", str(png)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"wrote {png}" in ok.stderr  # flushed before the process ended
    assert Image.open(png).text["steps"] == "2"  # complete: its metadata is at the end of the file
    assert (tmp_path / "exit-handler-ran").exists() and not (tmp_path / "teardown-ran").exists()

    (tmp_path / "exit-handler-ran").unlink()
    failed = subprocess.run([sys.executable, "-c", script, "-n", "0"], capture_output=True, text=True)
    assert failed.returncode == 2 and "error: -n must be from 1" in failed.stderr
    assert (tmp_path / "exit-handler-ran").exists() and (tmp_path / "teardown-ran").exists()


def test_a_commands_imports_run_without_collections_then_collection_resumes(monkeypatch, tmp_path):
    """The modules `generate` imports are loaded with the collector off and frozen after; the
    command itself runs with it on, and a failed import turns it back on too."""
    from glyph_engine import cli

    seen = []
    monkeypatch.setattr(cli.gc, "freeze", lambda: seen.append(("freeze", gc.isenabled())))
    original = cli.importing

    @contextlib.contextmanager
    def watched():
        with original():
            seen.append(("importing", gc.isenabled()))
            yield

    monkeypatch.setattr(cli, "importing", watched)
    result = CliRunner().invoke(cli.app, ["generate", "metal", "--ckpt", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert seen == [("importing", False), ("freeze", False)] and gc.isenabled()
    with pytest.raises(ImportError), original():
        import glyph_engine.no_such_module  # noqa: F401
    assert gc.isenabled()
