"""The one writer: atomic, and never over a device, FIFO, socket or folder; symlinks written through."""

import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, check_writable_file
from glyph_engine.images import save_folder

runner = CliRunner()


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def unix_socket(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the socket file stays after the socket is closed
    return path


def symlink(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


# (make the path to write in tmp_path, what the refusal says it is)
REFUSED = {
    "fifo": (lambda d: fifo(d / "out.png"), "it is a FIFO (named pipe), not a regular file"),
    "socket": (lambda d: unix_socket(d / "out.png"), "it is a socket, not a regular file"),
    "folder": (lambda d: folder(d / "out.png"), "it is a folder, not a regular file"),
    "symlink-to-fifo": (
        lambda d: symlink(d / "out.png", fifo(d / "pipe")),
        "it is a symlink to a FIFO (named pipe), not to a regular file",
    ),
    "symlink-to-folder": (
        lambda d: symlink(d / "out.png", folder(d / "sub")),
        "it is a symlink to a folder, not to a regular file",
    ),
    "symlink-loop": (lambda d: symlink(d / "out.png", d / "out.png"), "it is a symlink to a symlink loop"),
    "symlink-into-missing-folder": (
        lambda d: symlink(d / "out.png", d / "no" / "such" / "g.png"),
        "whose folder does not exist",
    ),
}


def snapshot(folder: Path) -> dict[str, tuple[int, str | None]]:
    """Every entry's type and, for symlinks, where it points: what a refused write must leave."""
    return {
        p.name: (stat.S_IFMT(p.lstat().st_mode), os.readlink(p) if p.is_symlink() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("make, message", REFUSED.values(), ids=REFUSED.keys())
def test_atomic_path_refuses_anything_but_a_regular_file_before_any_work(tmp_path, make, message):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(GlyphEngineError, match="refusing to write") as refused:
        with atomic_path(path) as tmp:
            tmp.write_text("work that must not be done")
    assert message in str(refused.value) and str(path) in str(refused.value)
    assert "\n" not in str(refused.value)
    assert snapshot(tmp_path) == before  # nothing replaced, no temporary file left


@pytest.mark.parametrize("make, message", REFUSED.values(), ids=REFUSED.keys())
def test_check_writable_file_refuses_the_same_with_the_same_words(tmp_path, make, message):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(GlyphEngineError, match="refusing to write") as refused:
        check_writable_file(path)
    assert message in str(refused.value)
    assert snapshot(tmp_path) == before


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "glyphs.png"
    target.write_text("old")
    link = symlink(tmp_path / "link.png", Path("real") / "glyphs.png")  # relative, as ln -s makes them
    chain = symlink(tmp_path / "chain.png", link)
    assert check_writable_file(chain) == chain
    with atomic_path(chain) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and stat.S_ISREG(target.lstat().st_mode)
    assert os.readlink(link) == "real/glyphs.png" and os.readlink(chain) == str(link)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["chain.png", "glyphs.png", "link.png", "real"]


def test_a_dangling_symlink_gets_its_target_created(tmp_path):
    link = symlink(tmp_path / "link.png", tmp_path / "made.png")
    check_writable_file(link)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "made.png").read_text() == "new" and link.is_symlink()


def generate(*args):
    return runner.invoke(app, ["generate", "metal", "-n", "1", "--steps", "2", *(str(a) for a in args)])


@pytest.fixture
def no_sampling_no_replacing(monkeypatch):
    """Fails the test, rather than the machine, if the refusal does not come first: sampling
    and every rename over a path fail loudly (not as OSError, which the CLI reports in one line)."""
    from glyph_engine.session import Session

    def sampled(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was refused")

    def replaced(src, dst, *args, **kwargs):
        raise AssertionError(f"{src} was about to be renamed over {dst}")

    monkeypatch.setattr(Session, "load", sampled)
    monkeypatch.setattr(os, "replace", replaced)
    monkeypatch.setattr(os, "rename", replaced)


def test_generate_refuses_dev_null_in_one_line(ckpt_path, no_sampling_no_replacing):
    result = generate("--ckpt", ckpt_path, "-o", "/dev/null")
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: refusing to write /dev/null: it is a character device, not a regular file; give a file name.\n"
    )
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_generate_refuses_a_symlink_to_a_fifo(ckpt_path, tmp_path, no_sampling_no_replacing):
    link = symlink(tmp_path / "g.png", fifo(tmp_path / "pipe"))
    result = generate("--ckpt", ckpt_path, "-o", link)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "symlink to a FIFO" in result.output
    assert link.is_symlink() and stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode)


def test_generate_writes_through_a_symlinked_output(ckpt_path, tmp_path):
    target = tmp_path / "real.png"
    target.write_text("old")
    link = symlink(tmp_path / "g.png", target)
    result = generate("--ckpt", ckpt_path, "-o", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and Image.open(target).format == "PNG"


def pixels(n):
    return np.full((n, 8, 8), 128, np.uint8)


def test_out_dir_glyphs_are_all_checked_before_any_is_replaced(tmp_path):
    out = tmp_path / "glyphs"
    out.mkdir()
    (out / "0000.png").write_text("old")
    fifo(out / "0002.png")
    with pytest.raises(GlyphEngineError, match=r"refusing to write .*0002.png: it is a FIFO"):
        save_folder(pixels(3), out, [{}] * 3)
    assert (out / "0000.png").read_text() == "old"
    assert stat.S_ISFIFO((out / "0002.png").lstat().st_mode)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["0000.png", "0002.png", "glyphs"]


def test_out_dir_glyph_symlinks_are_written_through(tmp_path):
    out, elsewhere = tmp_path / "glyphs", tmp_path / "elsewhere.png"
    out.mkdir()
    elsewhere.write_text("old")
    symlink(out / "0001.png", elsewhere)
    save_folder(pixels(2), out, [{}] * 2)
    assert (out / "0001.png").is_symlink() and Image.open(elsewhere).format == "PNG"
    assert Image.open(out / "0000.png").format == "PNG"


def test_train_refuses_its_outputs_before_training(tmp_path, monkeypatch):
    import glyph_engine.training.train as train_module
    from glyph_engine.training.commands import run_train

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained before refusing the model card"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    fifo(workdir / "MODEL_CARD.json")
    with pytest.raises(GlyphEngineError, match="MODEL_CARD.json: it is a FIFO"):
        run_train(tmp_path / "data.npz", workdir, 1, None, 1000, 200, False)
    assert stat.S_ISFIFO((workdir / "MODEL_CARD.json").lstat().st_mode)


def test_generate_refuses_any_out_dir_glyph_that_is_special_before_sampling(
    ckpt_path, tmp_path, no_sampling_no_replacing
):
    out = folder(tmp_path / "glyphs")
    fifo(out / "0003.png")  # the 4th of 2 prompts x 2 glyphs: not the first name, which was checked before
    result = runner.invoke(
        app, ["generate", "metal", "water", "-n", "2", "--ckpt", str(ckpt_path), "-o", str(tmp_path / "g.png"),
              "--out-dir", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "0003.png: it is a FIFO" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["0003.png"] and not (tmp_path / "g.png").exists()


def test_bench_refuses_a_special_result_file_before_measuring(ckpt_path, tmp_path, monkeypatch):
    import glyph_engine.benchmark as benchmark

    def measured(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output was refused")

    monkeypatch.setattr(benchmark, "run_benchmark", measured)
    out = folder(tmp_path / "bench")
    fifo(out / "results.md")
    result = runner.invoke(app, ["bench", "--ckpt", str(ckpt_path), "--backends", "torch", "--steps", "1",
                                 "--batch", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "results.md: it is a FIFO" in result.output


def test_without_following_a_symlink_is_refused_and_one_swapped_in_is_replaced(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    link = symlink(tmp_path / "manifest.jsonl", outside)
    with pytest.raises(GlyphEngineError, match="it is a symlink"):
        with atomic_path(link, follow_symlinks=False):
            pass
    link.unlink()
    with atomic_path(link, follow_symlinks=False) as tmp:
        symlink(link, outside)  # swapped in between the check and the rename
        tmp.write_text("new")
    assert not link.is_symlink() and link.read_text() == "new" and outside.read_text() == "keep"
