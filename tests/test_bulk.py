"""Bulk generation (`generate --prompts-file`): files, manifest, resuming, and Ray workers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from glyph_engine import bulk
from glyph_engine.bulk import MANIFEST, MAX_RETRIES, BulkJob, run_bulk
from glyph_engine.commands import GenerateRequest, run_generate
from glyph_engine.errors import GlyphEngineError
from glyph_engine.session import ModelSource
from glyph_engine.settings import GenerationSettings

PROMPTS = ["metal", "water", "a kind of fish found in the southern seas", "fire; flame"]
SETTINGS = GenerationSettings(steps=4, seed=3)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def manifest(out: Path) -> tuple[dict, list[dict]]:
    header, *lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    return header["job"], lines


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")  # a blank line is skipped
    return path


def job(prompts_file: Path, out: Path, ckpt: Path, **changes) -> BulkJob:
    fields = dict(
        prompts_file=prompts_file, out_dir=out, num_images=3, settings=SETTINGS, source=ModelSource(ckpt=ckpt)
    )
    return BulkJob(**{**fields, **changes, "chunk_images": changes.get("chunk_images", 5)})


def test_one_png_per_glyph_as_generate_draws_it_and_a_manifest(prompts_file, tmp_path, ckpt_path):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path))
    header, lines = manifest(out)
    assert header["prompts"] == 4 and header["num_images"] == 3
    assert [line["index"] for line in lines] == list(range(12))
    assert [line["prompt"] for line in lines] == [p for p in PROMPTS for _ in range(3)]
    assert sorted(p.name for p in out.glob("*.png")) == [line["file"] for line in lines]
    for prompt_number, prompt in enumerate(PROMPTS[::3]):  # "metal", and the last one
        alone = tmp_path / f"alone{prompt_number}"
        run_generate(
            GenerateRequest([prompt], 3, SETTINGS, source=ModelSource(ckpt=ckpt_path), out=None, out_dir=alone)
        )
        for i in range(3):
            line = lines[PROMPTS.index(prompt) * 3 + i]
            assert line["image"] == i
            assert Image.open(out / line["file"]).text["image_seed"] == str(line["seed"])
            assert np.abs(pixels(out / line["file"]) - pixels(alone / f"{i:04d}.png")).max() <= 1


def test_rerun_redoes_only_missing_or_damaged_glyphs(prompts_file, tmp_path, ckpt_path):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path))
    _, lines = manifest(out)
    before = {line["file"]: (out / line["file"]).stat().st_mtime_ns for line in lines}
    (out / lines[4]["file"]).unlink()
    with (out / lines[7]["file"]).open("ab") as f:
        f.write(b"damage")
    with (out / MANIFEST).open("a") as f:
        f.write('{"index": 9, "prompt": "fire')  # a line cut short by a kill
    message = run_bulk(job(prompts_file, out, ckpt_path))
    assert "wrote 2 glyphs" in message[0] and "10 were already there" in message[0]
    _, after = manifest(out)
    assert after == lines  # complete again, in order, one line per glyph
    for line in lines:
        changed = (out / line["file"]).stat().st_mtime_ns != before[line["file"]]
        assert changed == (line["index"] in (4, 7))
    assert "wrote 0 glyphs" in run_bulk(job(prompts_file, out, ckpt_path))[0]


def test_another_job_in_the_same_folder_is_refused(prompts_file, tmp_path, ckpt_path):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path, num_images=1))
    with pytest.raises(GlyphEngineError, match="holds another job"):
        run_bulk(job(prompts_file, out, ckpt_path, num_images=2))
    with pytest.raises(GlyphEngineError, match="holds another job"):
        run_bulk(job(prompts_file, out, ckpt_path, num_images=1, settings=GenerationSettings(steps=4, seed=4)))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "0001.png").write_bytes(b"")
    with pytest.raises(GlyphEngineError, match="no manifest"):
        run_bulk(job(prompts_file, stray, ckpt_path))


def test_resume_trusts_only_the_jobs_own_lines_and_files(prompts_file, tmp_path, ckpt_path):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path))
    _, lines = manifest(out)
    first_mtimes = {line["file"]: (out / line["file"]).stat().st_mtime_ns for line in lines}
    # Glyphs 1-3 are gone; lines point at copies outside the folder, or at another glyph's file.
    for index in (1, 2):
        (tmp_path / f"outside{index}.png").write_bytes((out / lines[index]["file"]).read_bytes())
    for index in (1, 2, 3):
        (out / lines[index]["file"]).unlink()
    (out / "000012.png").write_bytes(b"not of this job")
    tampered = [dict(line) for line in lines]
    tampered[1]["file"] = "../outside1.png"
    tampered[2]["file"] = str(tmp_path / "outside2.png")
    tampered[3].update(file=lines[4]["file"], sha256=lines[4]["sha256"])
    # The files of glyphs 5-7 are intact, but their lines are not this job's.
    tampered[5]["prompt"] = "metal"  # glyph 5 is "water"
    tampered[6]["seed"] += 1
    tampered[7]["image"] = True  # JSON true, which Python takes for 1
    extra = {**lines[11], "index": 12, "file": "000012.png", "sha256": hashlib.sha256(b"not of this job").hexdigest()}
    header = (out / MANIFEST).read_text().splitlines()[0]
    (out / MANIFEST).write_text("\n".join([header, *map(json.dumps, [*tampered, extra]), "[1, 2]", "junk"]) + "\n")
    message = run_bulk(job(prompts_file, out, ckpt_path))
    assert "wrote 6 glyphs" in message[0] and "6 were already there" in message[0], message
    _, after = manifest(out)
    assert after == lines  # the bad lines are gone, each glyph has its own line again
    for line in lines:
        assert hashlib.sha256((out / line["file"]).read_bytes()).hexdigest() == line["sha256"]
        redrawn = (out / line["file"]).stat().st_mtime_ns != first_mtimes.get(line["file"])
        assert redrawn == (line["index"] in (1, 2, 3, 5, 6, 7))


@pytest.mark.parametrize("link", [MANIFEST, "000004.png"])
def test_a_symlink_in_the_out_dir_is_refused(prompts_file, tmp_path, ckpt_path, link):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path))
    outside = tmp_path / "outside"
    (out / link).rename(outside)
    (out / link).symlink_to(outside)  # to the very bytes its line names
    before = outside.read_bytes()
    with pytest.raises(GlyphEngineError, match=f"{link} is a symbolic link"):
        run_bulk(job(prompts_file, out, ckpt_path))
    assert outside.read_bytes() == before and (out / link).is_symlink()


def test_a_manifest_swapped_for_a_symlink_after_the_check_gets_no_lines(prompts_file, tmp_path, ckpt_path, monkeypatch):
    out = tmp_path / "out"
    run_bulk(job(prompts_file, out, ckpt_path, num_images=1))
    (out / "000002.png").unlink()  # so the resume has a glyph to append
    outside = tmp_path / "outside.jsonl"
    outside.write_text("someone else's file\n")
    real_finished = bulk.finished

    def finished_then_swapped(*args):
        done = real_finished(*args)
        (out / MANIFEST).unlink()  # between the check and the open for appending
        (out / MANIFEST).symlink_to(outside)
        return done

    monkeypatch.setattr(bulk, "finished", finished_then_swapped)
    with pytest.raises(GlyphEngineError, match="is a symbolic link"):
        run_bulk(job(prompts_file, out, ckpt_path, num_images=1))
    assert outside.read_text() == "someone else's file\n"


@pytest.mark.parametrize(
    "first_line",
    [b"garbage", b"", b"[1, 2]", b'{"job": 3}', b'{"index": 0}', b'{"job": {"format": 1', b"\xff\xfe{}"],
    ids=["text", "empty", "not-an-object", "job-not-an-object", "no-job", "cut-short", "not-utf8"],
)
def test_a_damaged_first_line_says_so(tmp_path, first_line):
    glyphs = bulk.plan(PROMPTS, 1, 3)
    (tmp_path / MANIFEST).write_bytes(first_line + b"\n" + json.dumps(glyphs[0].record("0" * 64)).encode() + b"\n")
    with pytest.raises(GlyphEngineError, match=f"the first line of .*{MANIFEST} is damaged") as error:
        bulk.finished(tmp_path, {"format": 1}, glyphs)
    assert "another job" not in str(error.value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prompts-file", "{tmp}/none.txt", "--out-dir", "{tmp}/o"], "does not exist"),
        (["--prompts-file", "{empty}", "--out-dir", "{tmp}/o"], "no prompts"),
        (["--prompts-file", "{prompts}"], "--out-dir"),
        (["metal", "--prompts-file", "{prompts}", "--out-dir", "{tmp}/o"], "no prompts on the command line"),
        (["metal", "--ray", "local"], "--prompts-file"),
        (["--prompts-file", "{prompts}", "--out-dir", "{tmp}/o", "--chunk-size", "0"], "--chunk-size"),
    ],
)
def test_bulk_cli_errors_are_one_line(args, words, tmp_path, prompts_file, ckpt_path):
    from typer.testing import CliRunner

    from glyph_engine.cli import app

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    values = {"tmp": tmp_path, "prompts": prompts_file, "empty": empty}
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(ckpt_path), *(a.format(**values) for a in args)])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def _read_only_below(folder: Path, monkeypatch) -> None:
    """Makes creating or writing files below `folder` fail as on a read-only mount (chmod does not stop root)."""
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if Path(path).is_relative_to(folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)


@pytest.mark.parametrize(
    ("out_dir", "words"),
    [
        ("{tmp}/file.txt/sub", "Not a directory"),
        ("{tmp}/read-only", "Read-only file system"),
        ("{tmp}/has-a-folder-manifest", f"{MANIFEST} is not a regular file"),
        ("/proc/self", "cannot write in --out-dir /proc/self"),
        ("/proc/glyph-engine-test", "cannot write in --out-dir /proc/glyph-engine-test"),
        ("/sys/glyph-engine-test", "cannot write in --out-dir /sys/glyph-engine-test"),
    ],
    ids=["below-a-file", "read-only", "manifest-is-a-folder", "proc-self", "proc", "sys"],
)
def test_out_dirs_that_cannot_hold_a_job_are_one_line(out_dir, words, tmp_path, prompts_file, ckpt_path, monkeypatch):
    from typer.testing import CliRunner

    from glyph_engine.cli import app

    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "read-only").mkdir()
    _read_only_below(tmp_path / "read-only", monkeypatch)
    (tmp_path / "has-a-folder-manifest" / MANIFEST).mkdir(parents=True)
    args = ["generate", "--ckpt", str(ckpt_path), "--prompts-file", str(prompts_file), "-n", "1", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out-dir", out_dir.format(tmp=tmp_path)])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list((tmp_path / "read-only").iterdir())
    assert [p.name for p in (tmp_path / "has-a-folder-manifest").iterdir()] == [MANIFEST]


# `glyph-engine` whose Ray workers SIGKILL their own process inside a chunk, as an OOM killer
# would: FAULT "once" kills the first chunk run anywhere, "always" every run. The class is
# defined in __main__, so Ray ships it to the workers by value: no hook in glyph-engine itself.
# Every run is logged to RUNS before the kill, and the manifest's appended lines are copied to
# APPENDED before the driver rewrites it, so the test sees each glyph's write.
FAULTY_CLI = """
import json, os, shutil, signal, sys
from glyph_engine import bulk
from glyph_engine.cli import main

RUNS, KILLED, APPENDED, FAULT = sys.argv[1:5]
del sys.argv[1:5]


def first_kill(run):
    try:
        fd = os.open(KILLED, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    os.write(fd, run.encode())
    os.close(fd)
    return True


class FaultyWorker(bulk.ChunkWorker):
    def run(self, requests):
        chunk = [[r.prompt, r.first, r.count] for r in requests]
        run = json.dumps({"pid": os.getpid(), "chunk": chunk, "marker": os.environ.get("GLYPH_ENGINE_TEST_JOB")})
        with open(RUNS, "a") as log:
            log.write(run + "\\n")
        if FAULT == "always" or first_kill(run):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(requests)


compact = bulk._compact


def keep_appended(manifest, header, done):
    shutil.copy(manifest, APPENDED)
    compact(manifest, header, done)


bulk.ChunkWorker, bulk._compact = FaultyWorker, keep_appended
sys.argv[0] = "glyph-engine"
main()
"""
MARKER = "GLYPH_ENGINE_TEST_JOB"  # in the environment of every process the job starts, Ray's included


def run_faulty_job(tmp_path: Path, fault: str, args: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Runs the job to its end; fails if any process it started is still running 15 s after it ended."""
    files = [str(tmp_path / name) for name in ("runs.jsonl", "killed.json", "appended.jsonl")]
    marker = str(uuid.uuid4())
    command = [sys.executable, "-c", FAULTY_CLI, *files, fault, "generate", *args, "--ray", "local"]
    result = subprocess.run(
        command, env={**os.environ, MARKER: marker}, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    # The job's processes are found by their environment, not as the CLI's children: Ray's are
    # reparented when the CLI exits, so a tree scan after it ends would always come back empty.
    psutil.wait_procs(processes_marked(marker), timeout=15)
    left = processes_marked(marker)
    assert left == [], f"left running: {left}"
    runs = [json.loads(line) for line in Path(files[0]).read_text().splitlines()]
    assert runs and all(run["marker"] == marker for run in runs)  # so the scan above sees Ray's workers
    return result, runs


def processes_marked(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.slow  # about 25 s (Ray workers start twice): in `make test-slow`, which CI runs too
@pytest.mark.ray
def test_ray_workers_redo_a_killed_workers_chunk(tmp_path, ckpt_path):
    pytest.importorskip("ray")
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"{word} {i}" for i in range(5) for word in ("metal", "water")) + "\n")
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt_path), "--prompts-file", str(many), "--out-dir", str(out), "-n", "2", "--steps", "5"]
    result, runs = run_faulty_job(tmp_path, "once", [*args, "--workers", "2", "--chunk-size", "4"])
    assert result.returncode == 0, result.stderr
    killed = json.loads((tmp_path / "killed.json").read_text())
    after = runs[runs.index(killed) + 1 :]
    assert killed["pid"] not in {run["pid"] for run in after}  # that process ran nothing more
    assert [run for run in after if run["chunk"] == killed["chunk"]], runs  # its chunk ran again, elsewhere
    # Every glyph was written once: the killed chunk's glyphs only by its second run.
    appended = [json.loads(line) for line in (tmp_path / "appended.jsonl").read_text().splitlines()[1:]]
    assert sorted(line["index"] for line in appended) == list(range(20))
    _, lines = manifest(out)
    assert [line["index"] for line in lines] == list(range(20))
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [line["file"] for line in lines]
    # The same job in this process, with no worker killed, draws the same glyphs.
    run_bulk(job(many, tmp_path / "here", ckpt_path, num_images=2, settings=GenerationSettings(steps=5)))
    for line in lines:
        assert np.abs(pixels(out / line["file"]) - pixels(tmp_path / "here" / line["file"])).max() <= 1


@pytest.mark.ray
@pytest.mark.slow  # about 15-40 s: in `make test-slow`, which CI runs too
def test_a_chunk_lost_more_than_max_retries_times_ends_the_job_in_one_line(tmp_path, ckpt_path, prompts_file):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt_path), "--prompts-file", str(prompts_file), "--out-dir", str(out), "-n", "1"]
    result, runs = run_faulty_job(tmp_path, "always", [*args, "--steps", "2", "--workers", "1", "--chunk-size", "4"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.fullmatch(
        rf"error: a chunk of 4 glyphs was lost {MAX_RETRIES + 1} times \(\w+Error\); the glyphs written so far are "
        r"kept: run the same command again to resume\.",
        result.stderr.strip().splitlines()[-1],
    ), result.stderr
    # The one chunk ran on a new process each time, and no more often than that.
    assert len(runs) == MAX_RETRIES + 1 and len({run["pid"] for run in runs}) == MAX_RETRIES + 1, runs
    assert len({json.dumps(run["chunk"]) for run in runs}) == 1
    assert list(out.glob("*.png")) == []
