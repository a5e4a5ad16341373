"""`glyph-engine serve` end to end on loopback: a real server process on a local Ray.

One server serves every test of this module (Ray and the model start once); the last
tests kill its replica and then stop it with SIGTERM.
"""

from __future__ import annotations

import base64
import io
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

pytest.importorskip("ray.serve")

from serving import Server, descendants, find_process, is_loopback, listening  # noqa: E402

from glyph_engine.serve.api import BODY_TIMEOUT_S  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN = "serve-test-token-0123456789"
PROMPTS = ["metal", "water", "fire", "wood"]


@pytest.fixture(scope="module")
def server(ckpt_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--ckpt", str(ckpt_path), "--max-batch-size", "64", "--batch-wait-ms", "50", "--max-queue", "64"]
    server = Server(args, log, token=TOKEN)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def decode(image: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))))


def test_concurrent_clients_get_their_images_from_shared_batches(server, model):
    def client(i: int) -> tuple[int, dict]:
        reply = server.post({"prompt": PROMPTS[i % 4], "seed": i, "steps": 10})
        return reply.status_code, reply.json()

    before = server.metrics()
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(client, range(24)))
    assert [status for status, _ in replies] == [200] * 24
    for _, body in replies:
        assert len(body["images"]) == 1 and decode(body["images"][0]).shape == model.image_shape[1:]
    assert len({body["seeds"][0] for _, body in replies}) == 24
    images, batches = server.batches_since(before, 24)
    assert images == 24 and batches >= 1
    assert images / batches > 1  # mean images per U-Net batch: clients shared calls
    assert "ray_glyph_engine_queue_images" in server.metrics()


def test_serve_listens_on_loopback_only_and_ray_wants_a_token(server):
    """Every process of serve's local Ray listens on loopback only; its job agent, which runs
    shell commands, refuses a request without Ray's token."""
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
    # Ray's token for this run was not written to the user's home (Ray's default place).
    token_file = Path.home() / ".ray" / "auth_token"
    started = psutil.Process(server.process.pid).create_time()
    assert not token_file.exists() or token_file.stat().st_mtime < started


def test_same_seed_same_image_as_generate(server, ckpt_path, tmp_path):
    from glyph_engine.commands import GenerateRequest, run_generate
    from glyph_engine.session import ModelSource
    from glyph_engine.settings import GenerationSettings

    reply = server.post({"prompt": "a kind of fish", "n": 3, "steps": 8, "seed": 5})
    assert reply.status_code == 200
    served = [decode(image) for image in reply.json()["images"]]
    run_generate(
        GenerateRequest(
            ["a kind of fish"],
            3,
            GenerationSettings(steps=8, seed=5),
            source=ModelSource(ckpt=ckpt_path),
            out=None,
            out_dir=tmp_path,
        )
    )
    for i, image in enumerate(served):
        generated = np.asarray(Image.open(tmp_path / f"{i:04d}.png"))
        # Same backend, model and batch: the same pixels (one level allowed for float rounding).
        assert np.abs(image.astype(int) - generated.astype(int)).max() <= 1
    assert np.abs(served[0].astype(int) - served[1].astype(int)).max() > 8  # different seeds, different glyphs


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"n": 2}', 422),
        (b'{"prompt": " "}', 422),
        (b'{"prompt": "metal", "n": 1000}', 422),
        (b'{"prompt": "metal", "steps": 0}', 422),
        (b'{"prompt": "metal", "guidance": NaN}', 422),
        (b'{"prompt": "metal", "colour": "red"}', 422),
        (b'{"prompt": "' + b"a" * 40_000 + b'"}', 413),
    ],
    ids=["malformed", "no-prompt", "empty-prompt", "n", "steps", "nan-guidance", "unknown-field", "oversized"],
)
def test_bad_requests_get_4xx_and_the_server_stays_healthy(server, body, status):
    reply = requests.post(f"{server.url}/generate", data=body, headers=server.headers, timeout=30)
    assert reply.status_code == status and reply.json()["error"]
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_overload_gets_503_with_retry_after_not_a_longer_queue(server):
    def client(i: int) -> requests.Response:
        return server.post({"prompt": "metal", "n": 16, "seed": i, "steps": 5})

    # Every batch the overload can form (16 to 64 images) once first: a size the replica has
    # not met compiles the U-Net for it, and that time would count as sampling in the rate
    # below but not in the one Retry-After uses. A first overload left some sizes out, by chance.
    for n in (64, 48, 32):
        assert server.post({"prompt": "metal", "n": n, "seed": 99, "steps": 5}).status_code == 200
    assert client(99).status_code == 200  # a run of this size and steps: Retry-After's time per image-step
    before = server.metrics()
    with ThreadPoolExecutor(12) as pool:  # 192 images against a queue of 64
        replies = list(pool.map(client, range(12)))
    refused = [r for r in replies if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in replies)
    assert all("busy" in r.json()["error"] for r in refused)
    assert all(len(r.json()["images"]) == 16 for r in replies if r.status_code == 200)
    # A request is refused with 64 images of 5 steps waiting: Retry-After is their time at
    # the measured rate (within a factor 2: runs differ in size, and in load on this machine).
    images, _ = server.batches_since(before, 16 * (len(replies) - len(refused)))
    seconds = server.metrics()["ray_glyph_engine_batch_seconds_sum"] - before["ray_glyph_engine_batch_seconds_sum"]
    expected = 64 * seconds / images
    assert all(expected / 2 <= int(r.headers["retry-after"]) <= expected * 2 + 1 for r in refused), (
        expected,
        [r.headers["retry-after"] for r in refused],
    )
    assert server.post({"prompt": "metal", "steps": 2}).status_code == 200


def read_reply(conn: socket.socket, timeout: float) -> bytes:
    """All the server sends until it closes the connection (or `timeout` passes)."""
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    except OSError:  # timed out, or reset
        pass
    return data


def test_held_bodies_leave_health_and_new_clients_served(server):
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    assert server.post({"prompt": "metal", "steps": 2}).status_code == 200  # warm
    held = []
    try:
        # 300 connections from 10 addresses send their headers and 10 bytes of a 1000-byte body.
        for i in range(300):
            conn = socket.create_connection(("127.0.0.1", server.port), source_address=(f"127.0.0.{2 + i % 10}", 0))
            conn.sendall(head + b'{"prompt":')
            held.append(conn)
        began = time.monotonic()
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert server.post({"prompt": "metal", "steps": 2}, timeout=10).status_code == 200
        assert time.monotonic() - began < 5
        # Each held one gets a JSON 408 once its time to send the body is up, and is closed.
        replies = [read_reply(conn, BODY_TIMEOUT_S + 20) for conn in held]
    finally:
        for conn in held:
            conn.close()
    assert time.monotonic() - began < BODY_TIMEOUT_S + 20
    assert all(r.startswith(b"HTTP/1.1 408 ") and b'{"error": "the request body did not arrive' in r for r in replies)


def test_token_is_required(server):
    reply = requests.post(f"{server.url}/generate", json={"prompt": "metal"}, timeout=30)
    assert reply.status_code == 401 and "Bearer" in reply.json()["error"]
    assert server.post({"prompt": "metal", "steps": 2}).status_code == 200


def test_the_page_and_the_openai_routes_are_served_on_ray(server):
    page = requests.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200 and 'data-token-required="true"' in page.text
    models = requests.get(f"{server.url}/v1/models", headers=server.headers, timeout=30).json()
    body = {"model": models["data"][0]["id"], "prompt": "metal", "n": 2, "steps": 2}
    reply = requests.post(f"{server.url}/v1/images/generations", json=body, headers=server.headers, timeout=60)
    assert reply.status_code == 200 and [decode(d["b64_json"]).shape for d in reply.json()["data"]] == [(32, 32)] * 2
    refused = requests.post(f"{server.url}/v1/images/generations", json=body, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_killed_replica_fails_requests_fast_then_recovers(server):
    replica = find_process(server.process.pid, "ServeReplica")

    def client(i: int) -> tuple[int, dict, float]:
        reply = server.post({"prompt": PROMPTS[i % 4], "seed": i, "steps": 20, "n": 4}, timeout=90)
        return reply.status_code, reply.json(), time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        # 32 images at 20 steps: several seconds of sampling. The batcher may take the first
        # request alone (the others came after its 50 ms wait) and finish it before the kill,
        # so the kill waits for a run of 8 images or more: at least two requests in it.
        running = [pool.submit(client, i) for i in range(8)]
        server.wait_sampling(8)
        killed = time.monotonic()
        replica.kill()
        outcomes = [f.result() for f in running]
    assert time.monotonic() - killed < 10
    # Answered before the kill: the images. In flight (or queued in the replica) when it died:
    # Serve's 500, as this API's JSON, at once.
    after_kill = [(status, body) for status, body, at in outcomes if at > killed]
    assert len(after_kill) >= 2, outcomes
    assert all(status == 200 for status, _, at in outcomes if at <= killed), outcomes
    failed = {"error": "the model server failed while handling this request; retry it."}
    assert after_kill == [(500, failed)] * len(after_kill), outcomes
    # Serve starts a new replica; requests succeed again.
    server.wait_answering(120)
    assert find_process(server.process.pid, "ServeReplica").pid != replica.pid


def test_sigterm_drains_in_flight_requests_and_stops_every_process(server):
    # A replica that answers, and no run of the test before still reported as sampling (its
    # replica may have been killed), so that the signal comes while this test's run samples.
    server.wait_answering(120)
    server.wait_sampling(0, at_most=True)
    started = descendants(server.process.pid)
    assert started  # Ray's processes
    with ThreadPoolExecutor(4) as pool:
        # One run of 32 images at 20 steps, several seconds: the signal comes while it samples.
        running = [pool.submit(server.post, {"prompt": "metal", "seed": i, "steps": 20, "n": 8}) for i in range(4)]
        server.wait_sampling(8)
        stop = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        statuses = [f.result().status_code for f in running]
    server.process.wait(40)
    assert time.monotonic() - stop < 30
    assert statuses == [200] * 4  # in-flight requests finished
    survivors = [p for p in started if p.is_running() and p.status() != "zombie"]
    assert survivors == []
