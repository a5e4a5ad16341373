"""A Ray that glyph-engine starts itself is private to this machine (issue: Ray on loopback only).

Every process of a local Ray, started by `serve` or by a bulk job with `--ray local`, listens
on loopback only, and its job agent (which runs shell commands) wants a token. Sockets are
read from the kernel for the whole process tree, so a Ray process that binds anywhere else
fails the test, whichever Ray component it is.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

pytest.importorskip("ray.serve")

from serving import Server, free_port  # noqa: E402

pytestmark = pytest.mark.ray


def listening(root: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket in `root`'s process tree."""
    found = set()
    try:
        tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in tree:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue  # a worker that ended meanwhile
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, how gRPC's dual-stack sockets show 127.0.0.1
    return ip.is_loopback


def test_serve_listens_on_loopback_only_and_ray_wants_a_token(ckpt_path, tmp_path):
    server = Server(["--ckpt", str(ckpt_path)], tmp_path / "serve.log")
    try:
        server.wait_ready()
        sockets = listening(server.process.pid)
        names = {name for name, _, _ in sockets}
        # The tree really is a running Ray: GCS, raylet and the replica's worker all listen.
        assert {"gcs_server", "raylet"} <= names, sockets
        assert any(port == server.port for _, _, port in sockets)  # the HTTP proxy, where the user asked
        exposed = sorted(s for s in sockets if not is_loopback(s[1]))
        assert exposed == [], f"listening beyond loopback: {exposed}"
        # The job agent would run this for anyone; without Ray's token it must refuse. (The
        # agent's other HTTP port, Prometheus metrics, answers 405 to a POST.)
        agents = [p for name, _, p in sockets if name.startswith("ray::DashboardAgent")]
        codes = []
        for port in agents:
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/api/jobs/", json={"entrypoint": "id"}, timeout=5)
            except requests.RequestException:
                continue  # a gRPC port of the agent: not HTTP
            codes.append(reply.status_code)
        assert 401 in codes and not any(200 <= code < 300 for code in codes), (codes, sockets)
        # Nothing was written to the user's home for the token.
        assert not (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN_PATH")
    finally:
        server.stop()


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


@pytest.mark.parametrize("mode", ["disabled", "none"])
def test_a_local_ray_without_token_auth_is_refused_before_it_starts(mode, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": mode}
    result = subprocess.run(
        [sys.executable, "-m", "glyph_engine", "serve", "--port", str(free_port()), "--metrics-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RAY_AUTH_MODE" in lines[0] and "token" in lines[0], result.stderr


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
