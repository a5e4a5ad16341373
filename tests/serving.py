"""Helpers for tests that start `glyph-engine serve` or Ray jobs as real processes, or the
HTTP API on a real server in this process."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests


@contextmanager
def in_process(service, token: str | None) -> Iterator[str]:
    """The API app of `service` on a real uvicorn server on loopback, at an unused port; yields
    its base URL."""
    import uvicorn

    from glyph_engine.serve.api import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(service, token), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def find_process(root: int, marker: str, timeout: float = 60) -> psutil.Process:
    """The first descendant of `root` whose command line names `marker` (Ray titles its actors)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in descendants(root):
            try:
                if marker in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process {marker!r} under {root} within {timeout} s")


class Server:
    """`glyph-engine serve` in its own session, as a service manager would start it."""

    def __init__(self, args: list[str], log: Path, token: str | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        command = [sys.executable, "-m", "glyph_engine", "serve", "--port", str(self.port)]
        command += ["--metrics-port", str(self.metrics_port), *args]
        env = {**os.environ, "GLYPH_ENGINE_TOKEN": token} if token else dict(os.environ)
        # Ray reports metrics every 10 s by default; tests read them sooner.
        env.setdefault("RAY_metrics_report_interval_ms", "1000")
        self.log = log
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited: {self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or no replica yet
                pass
            time.sleep(0.5)
        raise AssertionError(f"serve not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def post(self, body: object, timeout: float = 120, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/generate", json=body, headers=self.headers, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        """glyph-engine's series from Ray's Prometheus endpoint, summed over label sets."""
        # Ray's metrics agent is a process of its own and may open its port after the API is up.
        deadline = time.monotonic() + 30
        while True:
            try:
                text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("ray_glyph_engine_"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    def batches_since(self, before: dict[str, float], images: int, timeout: float = 60) -> tuple[float, float]:
        """(images, U-Net batches) the server counted since the `before` metrics, once all
        `images` are counted: Ray exports metrics every few seconds, not at once."""
        deadline = time.monotonic() + timeout
        while True:
            after = self.metrics()
            counted = after.get("ray_glyph_engine_images_total", 0) - before.get("ray_glyph_engine_images_total", 0)
            if counted >= images or time.monotonic() > deadline:
                key = "ray_glyph_engine_batch_images_count"
                return counted, after.get(key, 0) - before.get(key, 0)
            time.sleep(1)

    def wait_sampling(self, images: int, timeout: float = 30, at_most: bool = False) -> None:
        """Returns once the server reports a sampling run of at least `images` images running,
        or with `at_most`, no more than `images` (metrics lag about 1 s; an earlier run may
        still show)."""
        deadline = time.monotonic() + timeout
        while True:
            reported = self.metrics().get("ray_glyph_engine_sampling_images", 0.0)
            if reported <= images if at_most else reported >= images:
                return
            if time.monotonic() > deadline:
                bound = "at most" if at_most else "at least"
                raise AssertionError(f"no sampling run of {bound} {images} images reported within {timeout} s")
            time.sleep(0.1)

    def wait_answering(self, timeout: float) -> None:
        """Returns once a small request succeeds: a replica is up and serving."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.post({"prompt": "metal", "steps": 2}, timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"the service did not answer a request within {timeout} s")

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


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
