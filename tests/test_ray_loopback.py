"""A Ray that glyph-engine starts itself is private to this machine: every process of the
local Ray that a bulk job with `--ray local` starts listens on loopback only (serve's: in
test_serve.py, on its shared server), and a local Ray without token auth is refused.
Sockets are read from the kernel for the whole process tree, so a Ray process that binds
anywhere else fails the test, whichever Ray component it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")

from serving import free_port, is_loopback, listening  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.mark.slow  # about 20 s (a local Ray starts): in `make test-slow`, which CI runs too
def test_bulk_on_a_local_ray_listens_on_loopback_only(ckpt_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("metal\nwater\n")
    command = [sys.executable, "-m", "glyph_engine", "generate", "--ckpt", str(ckpt_path), "--prompts-file"]
    command += [str(prompts), "--out-dir", str(tmp_path / "out"), "-n", "2", "--steps", "2", "--ray", "local"]
    log = tmp_path / "log.txt"
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[tuple[str, str, int]] = set()
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            seen |= listening(process.pid)
            time.sleep(0.2)
        assert process.wait(30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the sockets of a running Ray were read
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert exposed == [], f"listening beyond loopback: {exposed}"


@pytest.mark.parametrize("mode", ["disabled", "none", ""])
def test_a_local_ray_without_token_auth_is_refused_before_it_starts(mode, monkeypatch):
    from glyph_engine.errors import GlyphEngineError
    from glyph_engine.ray_cluster import ray_init

    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with pytest.raises(GlyphEngineError, match="RAY_AUTH_MODE=.* turns off Ray's token authentication"):
        ray_init(None)


def test_serve_says_why_in_one_line_when_token_auth_is_off():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "glyph_engine", "serve", "--port", str(free_port())]
    command += ["--metrics-port", str(free_port())]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RAY_AUTH_MODE=disabled" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("version", "ok"), [("2.58.1", False), ("2.52.0", False), ("2.59.0", False), ("2.60.0rc1", True), ("3.0.0", True)]
)
def test_ray_releases_before_the_tested_one_are_refused(version, ok):
    from glyph_engine.errors import GlyphEngineError
    from glyph_engine.ray_cluster import _check_version

    if ok:
        _check_version(version)
    else:
        with pytest.raises(GlyphEngineError, match="older than 2.60"):
            _check_version(version)
