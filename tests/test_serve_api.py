"""The HTTP API and the batcher without Ray: a fake model service behind the real app."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from glyph_engine.errors import GlyphEngineError  # noqa: E402
from glyph_engine.pipeline import Generation, Request  # noqa: E402
from glyph_engine.serve.api import MAX_BODY_BYTES, ProxyGuard, build_app  # noqa: E402
from glyph_engine.serve.batcher import BatchConfig, Batcher, BatchKey, GuidanceTooStrong, Overloaded  # noqa: E402

from fake_service import FakeService, fake_generation  # noqa: E402

TOKEN = "0123456789abcdef-test"


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    return TestClient(build_app(service, token=None))


def test_generate_returns_decodable_pngs_and_seeds(client, service):
    reply = client.post("/generate", json={"prompt": "metal", "n": 3, "steps": 7, "guidance": 2.5, "seed": 4})
    assert reply.status_code == 200
    body = reply.json()
    assert len(body["images"]) == 3 and body["seeds"] == [0, 1, 2]
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (8, 8)
    assert service.calls == [(Request("metal", 3, 4), BatchKey(7, 2.5))]


def test_defaults(client, service):
    assert client.post("/generate", json={"prompt": "metal"}).status_code == 200
    assert service.calls == [(Request("metal", 1, 0), BatchKey(20, None))]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("{", 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ('"metal"', 400, "JSON object"),
        ("{}", 422, "prompt: Field required"),
        ('{"prompt": ""}', 422, "prompt"),
        ('{"prompt": "   "}', 422, "empty"),
        ('{"prompt": 5}', 422, "prompt"),
        ('{"prompt": "a", "n": 0}', 422, "n:"),
        ('{"prompt": "a", "n": 257}', 422, "n:"),
        ('{"prompt": "a", "n": "3"}', 422, "n:"),
        ('{"prompt": "a", "n": 2.5}', 422, "n:"),
        ('{"prompt": "a", "steps": 0}', 422, "steps"),
        ('{"prompt": "a", "steps": 1001}', 422, "at most 1000"),
        ('{"prompt": "a", "guidance": NaN}', 422, "finite"),
        ('{"prompt": "a", "guidance": Infinity}', 422, "finite"),
        ('{"prompt": "a", "guidance": -1}', 422, "guidance"),
        ('{"prompt": "a", "guidance": 1e308}', 422, "guidance: Input should be less than or equal to 100"),
        ('{"prompt": "a", "guidance": 100.5}', 422, "guidance"),
        ('{"prompt": "a", "seed": -1}', 422, "seed"),
        ('{"prompt": "a", "negative": "x"}', 422, "negative: Extra inputs are not permitted"),
        (json.dumps({"prompt": "a" * 1001}), 422, "at most 1000 characters"),
        (json.dumps({"prompt": "\ud800"}), 400, "not valid JSON"),  # a lone surrogate is not text
    ],
)
def test_bad_requests_get_4xx_json(client, service, body, status, words):
    reply = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]
    assert service.calls == []
    assert client.get("/healthz").status_code == 200


def test_oversized_body_is_refused_before_it_is_read(client, service):
    huge = json.dumps({"prompt": "a" * (MAX_BODY_BYTES + 10)})
    assert client.post("/generate", content=huge).status_code == 413

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b" " * 1000

    reply = client.post("/generate", content=chunks())
    assert reply.status_code == 413 and "bytes" in reply.json()["error"]
    assert service.calls == []


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    assert client.get("/generate").status_code == 405


def test_overload_is_503_with_retry_after(client, service):
    service.overloaded = True
    reply = client.post("/generate", json={"prompt": "metal"})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "7"
    assert "busy" in reply.json()["error"]


def test_guidance_that_overflows_is_422_and_other_failures_500_json(client, service):
    service.fails = GuidanceTooStrong(90.0, 4.0)
    reply = client.post("/generate", json={"prompt": "metal", "guidance": 90})
    assert reply.status_code == 422 and "send a lower guidance (the model's default is 4)" in reply.json()["error"]
    service.fails = RuntimeError("the U-Net ran out of memory")
    reply = client.post("/generate", json={"prompt": "metal"})
    assert reply.status_code == 500 and "RuntimeError: the U-Net ran out of memory" in reply.json()["error"]


def test_token_guards_everything_but_health_and_docs(service):
    client = TestClient(build_app(service, token=TOKEN))
    assert client.post("/generate", json={"prompt": "metal"}).status_code == 401
    wrong = client.post("/generate", json={"prompt": "metal"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    good = client.post("/generate", json={"prompt": "metal"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_openapi_documents_the_request_schema(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"prompt", "n", "steps", "guidance", "seed"}
    assert body["additionalProperties"] is False and body["required"] == ["prompt"]
    assert client.get("/docs").status_code == 200


# The batcher, driven by a fake sampling run that records its batches.


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[list[Request], BatchKey]] = []
        self.ran: list[int] = []
        self.sampled: list[int] = []
        self.queue: list[int] = []
        self.rejections = 0

    def run(self, requests, key):
        self.batches.append((list(requests), key))
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("sampling failed")
        return [fake_generation(r) for r in requests]

    def sampling(self, images):
        self.sampled.append(images)

    def batch_ran(self, images, seconds):
        self.ran.append(images)

    def queue_changed(self, images):
        self.queue.append(images)

    def rejected(self):
        self.rejections += 1


def run_clients(config: BatchConfig, submissions):
    recorder = Recorder()

    async def main():
        batcher = Batcher(recorder.run, config, recorder)
        return await asyncio.gather(*(batcher.submit(r, k) for r, k in submissions), return_exceptions=True)

    return recorder, asyncio.run(main())


def test_concurrent_requests_share_runs_by_key_and_stay_separate():
    a, b = BatchKey(20, None), BatchKey(10, 2.0)
    submissions = [(Request(f"p{i}", 1 + i % 2, seed=i), a if i % 3 else b) for i in range(9)]
    recorder, results = run_clients(BatchConfig(max_batch_images=64, wait_s=0.05), submissions)
    keys = [key for _, key in recorder.batches]
    assert sorted(keys, key=str) == sorted([a, b], key=str)  # one run per key
    for (request, _), result in zip(submissions, results, strict=True):
        assert result.prompts == [request.prompt] * request.count
    assert sum(recorder.ran) == sum(r.count for r, _ in submissions)


def test_runs_hold_at_most_max_batch_images():
    submissions = [(Request(f"p{i}", 3), BatchKey(20, None)) for i in range(5)]
    recorder, results = run_clients(BatchConfig(max_batch_images=7, wait_s=0.05), submissions)
    assert recorder.ran == [6, 6, 3] and all(isinstance(r, Generation) for r in results)
    assert recorder.queue[-1] == 0


def test_batch_size_one_turns_batching_off():
    submissions = [(Request(f"p{i}", 1), BatchKey(20, None)) for i in range(4)]
    recorder, _ = run_clients(BatchConfig(max_batch_images=1, wait_s=0.05), submissions)
    assert recorder.ran == [1, 1, 1, 1]


def test_a_failed_run_fails_its_requests_only():
    key = BatchKey(20, None)
    submissions = [(Request("boom", 1), key), (Request("boom", 1), key), (Request("fine", 1), BatchKey(5, None))]
    recorder, results = run_clients(BatchConfig(max_batch_images=8, wait_s=0.05), submissions)
    assert [type(r).__name__ for r in results] == ["RuntimeError", "RuntimeError", "Generation"]


def test_full_queue_refuses_at_once():
    key = BatchKey(20, None)
    submissions = [(Request(f"p{i}", 4), key) for i in range(5)]
    recorder, results = run_clients(BatchConfig(max_batch_images=4, wait_s=0.05, max_queued_images=8), submissions)
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 3 and recorder.rejections == 3
    assert sum(isinstance(r, Generation) for r in results) == 2
    assert recorder.sampled == [4, 0, 4, 0]  # the sampling gauge: each run's images, then 0


def test_retry_after_is_the_queued_work_times_the_measured_time_per_image_step():
    per_image_step = 0.0025
    recorder = Recorder()

    def run(requests, key):
        time.sleep(per_image_step * key.steps * sum(r.count for r in requests))
        return [fake_generation(r) for r in requests]

    async def main():
        batcher = Batcher(run, BatchConfig(max_batch_images=4, wait_s=0, max_queued_images=80), recorder)
        await batcher.submit(Request("first", 4), BatchKey(20, None))  # 0.2 s: measures the time per image-step
        # 80 images at 10 steps fill the queue; the 21st request finds them all waiting.
        key = BatchKey(10, None)
        clients = [asyncio.create_task(batcher.submit(Request(f"p{i}", 4), key)) for i in range(21)]
        done, waiting = await asyncio.wait(clients, timeout=0.05)
        for task in waiting:
            task.cancel()
        assert [type(task.exception()) for task in done] == [Overloaded]
        return done.pop().exception().retry_after

    # 80 images x 10 steps at 2.5 ms: 2 s, rounded up (3 when the sleeps ran a little long).
    assert asyncio.run(main()) in (2, 3)


class BatchingService(FakeService):
    """The fake service behind a real batcher, whose run fails for the prompt "boom"."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()
        self.batcher = Batcher(self.recorder.run, BatchConfig(max_batch_images=8, wait_s=0.05), self.recorder)

    async def generate(self, request: Request, key: BatchKey) -> Generation:
        return await self.batcher.submit(request, key)


def test_a_failed_sampling_run_gives_500_to_its_requests_only():
    import httpx

    service = BatchingService()
    bodies = [{"prompt": "boom", "seed": 1}, {"prompt": "fine", "seed": 2}, {"prompt": "fine", "steps": 5}]

    async def main():
        transport = httpx.ASGITransport(app=build_app(service, token=None))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/generate", json=body) for body in bodies))

    replies = asyncio.run(main())
    # "boom" and the first "fine" shared a run (same steps): both fail; the other run is unharmed.
    assert [len(requests) for requests, _ in service.recorder.batches] == [2, 1]
    assert [r.status_code for r in replies] == [500, 500, 200]
    assert all("RuntimeError: sampling failed" in r.json()["error"] for r in replies[:2])


# `serve` refuses bad options before starting anything.


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "0.0.0.0"], "--token"),
        (["--host", "0.0.0.0", "--token", "short"], "at least 16 characters"),
        (["--port", "0"], "--port must be from 1 to 65535"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--replicas", "3", "--max-replicas", "2"], "--max-replicas at least --replicas"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--num-gpus", "-1"], "--num-gpus"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "does not exist"),
    ],
)
def test_serve_refuses_bad_options_before_starting(args, words, monkeypatch):
    from typer.testing import CliRunner

    from glyph_engine.cli import app
    from glyph_engine.serve import server

    started = []
    monkeypatch.setattr(server, "ray_init", lambda *a: started.append(a))
    monkeypatch.delenv("GLYPH_ENGINE_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert started == []


def test_non_loopback_with_a_token_or_insecure_passes_the_checks():
    from glyph_engine.serve.server import ServeOptions
    from glyph_engine.session import ModelSource

    for extra in ({"token": "a" * 16}, {"insecure": True}):
        ServeOptions(source=ModelSource(), batch=BatchConfig(), host="0.0.0.0", **extra).check()
    ServeOptions(source=ModelSource(), batch=BatchConfig(), host="::1").check()  # loopback needs neither


def test_serve_refuses_a_port_in_use_before_starting_ray(monkeypatch):
    import socket

    from typer.testing import CliRunner

    from glyph_engine.cli import app
    from glyph_engine.serve import server

    started = []
    monkeypatch.setattr(server, "ray_init", lambda *a: started.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for option in ("--port", "--metrics-port"):
            result = CliRunner().invoke(app, ["serve", option, port])
            assert result.exit_code == 2 and f"pick another {option}" in result.output
    assert started == []


# `ProxyGuard`, which runs in Ray Serve's HTTP proxy: here in front of the app on uvicorn, the
# server Serve's proxy runs, with small limits.


@pytest.fixture
def guarded(service):
    """The app behind ProxyGuard on a real uvicorn server (the proxy's server); yields its port."""
    import uvicorn

    guard = ProxyGuard(build_app(service, token=None), body_timeout_s=2.0, max_reading=8, max_reading_per_client=4)
    server = uvicorn.Server(uvicorn.Config(guard, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(5)


def hold_body(port: int, client: str) -> socket.socket:
    """A connection from `client` that sends headers and 10 of 1000 body bytes, then nothing."""
    conn = socket.create_connection(("127.0.0.1", port), source_address=(client, 0))
    conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt":')
    return conn


def reply_of(conn: socket.socket, timeout: float = 5) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of the reply, read until the server closes the connection."""
    conn.settimeout(timeout)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_guard_times_out_held_bodies_and_caps_them_per_client_and_in_all(guarded):
    import httpx

    url = f"http://127.0.0.1:{guarded}"
    held = [hold_body(guarded, "127.0.0.2") for _ in range(4)]
    time.sleep(0.2)
    status, headers, body = reply_of(hold_body(guarded, "127.0.0.2"))  # a fifth from that client: refused at once
    assert status == 429 and "finish those first" in body["error"] and headers["retry-after"] == "2"
    # Other clients, and requests without a body, are served while those wait.
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.post(f"{url}/generate", json={"prompt": "metal"}).status_code == 200
    held += [hold_body(guarded, "127.0.0.3") for _ in range(4)]
    time.sleep(0.2)
    status, headers, body = reply_of(hold_body(guarded, "127.0.0.4"))  # 8 bodies in all: the cap
    assert status == 503 and "retry in 2 s" in body["error"] and headers["retry-after"] == "2"
    assert httpx.get(f"{url}/healthz").status_code == 200
    began = time.monotonic()
    for conn in held:  # each gets a JSON 408 after its 2 s, and is closed
        status, headers, body = reply_of(conn)
        assert status == 408 and "did not arrive within 2 s" in body["error"] and headers["connection"] == "close"
    assert time.monotonic() - began < 3
    assert httpx.post(f"{url}/generate", json={"prompt": "metal"}).status_code == 200


def test_guard_refuses_oversized_bodies_before_the_replica(guarded, service):
    import httpx

    url = f"http://127.0.0.1:{guarded}/generate"
    reply = httpx.post(url, content=b"x" * (MAX_BODY_BYTES + 1))
    assert reply.status_code == 413 and "bytes" in reply.json()["error"]
    reply = httpx.post(url, content=iter([b" " * 1000] * (MAX_BODY_BYTES // 1000 + 2)))  # chunked, no length
    assert reply.status_code == 413 and "bytes" in reply.json()["error"]
    assert service.calls == []


async def serve_like(scope, receive, send):
    """Replies as Ray Serve's proxy does when it cannot reach a working replica."""
    path = scope["path"]
    if path == "/raise":
        raise RuntimeError("proxy bug")
    if path == "/died":  # a replica died mid-request: Serve sends nothing
        return
    status, text = {"/busy": (503, "Request dropped due to backpressure"), "/slow": (408, "Request 1 timed out")}.get(
        path, (200, "success")
    )
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()[:5], "more_body": True})
    await send({"type": "http.response.body", "body": text.encode()[5:]})


def test_guard_turns_the_proxys_own_errors_into_json():
    client = TestClient(ProxyGuard(serve_like))
    busy = client.get("/busy")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
    assert busy.json() == {"error": "the server is busy or has no replica ready; retry in 2 s."}
    assert client.get("/slow").status_code == 408 and "not answered in time" in client.get("/slow").json()["error"]
    for path in ("/died", "/raise"):
        reply = client.get(path)
        assert reply.status_code == 500 and reply.json() == {
            "error": "the model server failed while handling this request; retry it."
        }
    assert client.get("/-/healthz").text == "success"  # not an error: untouched


def test_guard_passes_the_apps_replies_through(service):
    client = TestClient(ProxyGuard(build_app(service, token=TOKEN)))
    reply = client.post("/generate", json={"prompt": "metal"})
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    good = client.post("/generate", json={"prompt": "metal", "n": 2}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and len(good.json()["images"]) == 2
    assert service.calls == [(Request("metal", 2, 0), BatchKey(20, None))]


def test_a_token_that_is_not_printable_ascii_is_refused_at_start():
    from glyph_engine.serve.server import ServeOptions
    from glyph_engine.session import ModelSource

    for token in ("jeton-secret-été-1234", "sixteen chars ok", "tab\there-0123456789"):
        with pytest.raises(GlyphEngineError, match="--token must be printable ASCII without spaces"):
            ServeOptions(source=ModelSource(), batch=BatchConfig(), token=token).check()


def test_replica_and_resource_options_reach_the_deployment(monkeypatch):
    from typer.testing import CliRunner

    from glyph_engine.cli import app
    from glyph_engine.serve import server
    from glyph_engine.serve.deployment import GlyphServer

    chosen = []
    monkeypatch.setattr(server, "run_serve", lambda options, report: chosen.append(options))
    monkeypatch.setattr(server.os, "cpu_count", lambda: 8)
    runner = CliRunner()
    limits = ["--max-batch-size", "8", "--max-queue", "100"]
    for args in (
        ["--replicas", "3", "--num-cpus", "2.5", "--num-gpus", "0.5"],
        ["--replicas", "2", "--max-replicas", "5"],
    ):
        assert runner.invoke(app, ["serve", *limits, *args]).exit_code == 0
    fixed, scaled = (server._deployment_options(options) for options in chosen)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.5, "num_gpus": 0.5}
    assert fixed["max_ongoing_requests"] == 108 and fixed["max_queued_requests"] == 100
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 8}
    assert scaled["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0.0}  # the machine's 8 cores over 2 replicas
    # Serve takes them as they are.
    config = GlyphServer.options(**fixed)._deployment_config
    assert (config.num_replicas, config.max_ongoing_requests, config.max_queued_requests) == (3, 108, 100)
    autoscaling = GlyphServer.options(**scaled)._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 5)


class FailingSession:
    """A session whose every sampling run gives NaN, as the pipeline reports it."""

    class model:
        default_guidance = 4.0

    def __init__(self):
        self.settings = []

    def generate_requests(self, requests, settings):
        self.settings.append(settings)
        raise GlyphEngineError("sampling produced NaN or infinite values in 1 of 1 images")


def test_a_replica_samples_with_serves_settings_and_the_requests_steps_and_guidance():
    from types import SimpleNamespace

    from glyph_engine.schedule import SamplerConfig
    from glyph_engine.serve.deployment import GlyphServer
    from glyph_engine.serve.service import ReplicaConfig
    from glyph_engine.session import ModelSource
    from glyph_engine.settings import GenerationSettings

    session = FailingSession()
    served = GenerationSettings(sampler=SamplerConfig(name="dpmpp-3m", order=2))
    config = ReplicaConfig(source=ModelSource(), batch=BatchConfig(max_batch_images=8), token=None, settings=served)
    with pytest.raises(GlyphEngineError):
        GlyphServer.func_or_class._run(
            SimpleNamespace(_session=session, _config=config), [Request("m", 1)], BatchKey(7, 3.0)
        )
    (settings,) = session.settings
    assert (settings.sampler, settings.steps, settings.guidance, settings.batch_size) == (served.sampler, 7, 3.0, 8)


@pytest.mark.parametrize(
    ("guidance", "raised"),
    [(50.0, GuidanceTooStrong), (4.0, GlyphEngineError), (None, GlyphEngineError)],
    ids=["client-guidance", "default-guidance", "model-default"],
)
def test_an_overflow_blames_the_clients_guidance_only_above_the_models(guidance, raised):
    from types import SimpleNamespace

    from glyph_engine.serve.deployment import GlyphServer
    from glyph_engine.serve.service import ReplicaConfig
    from glyph_engine.session import ModelSource

    # The replica's run on a faked session: no model to load.
    replica = SimpleNamespace(
        _session=FailingSession(), _config=ReplicaConfig(source=ModelSource(), batch=BatchConfig(), token=None)
    )
    with pytest.raises((GlyphEngineError, GuidanceTooStrong)) as e:
        GlyphServer.func_or_class._run(replica, [Request("metal", 1)], BatchKey(20, guidance))
    assert type(e.value) is raised
