"""The HTTP API and the batcher without Ray: a fake model service behind the real app."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from glyph_engine.pipeline import Generation, Request  # noqa: E402
from glyph_engine.serve.api import MAX_BODY_BYTES, build_app  # noqa: E402
from glyph_engine.serve.batcher import BatchConfig, Batcher, BatchKey, Overloaded  # noqa: E402
from glyph_engine.settings import StepImpl  # noqa: E402

TOKEN = "0123456789abcdef-test"


def fake_generation(request: Request) -> Generation:
    return Generation(
        images=torch.full((request.count, 1, 8, 8), 0.5),
        prompts=[request.prompt] * request.count,
        seeds=list(range(request.first, request.first + request.count)),
        guidance=1.0,
        guidance_interval=None,
        center_noise=False,
        step_impl=StepImpl.torch,
    )


class FakeService:
    max_steps = 1000

    def __init__(self) -> None:
        self.calls: list[tuple[Request, BatchKey]] = []
        self.overloaded = False

    def healthy(self) -> bool:
        return True

    def describe(self) -> dict[str, str]:
        return {"backend": "fake"}

    async def generate(self, request: Request, key: BatchKey) -> Generation:
        if self.overloaded:
            raise Overloaded(7)
        self.calls.append((request, key))
        return fake_generation(request)

    def encode_png(self, generation: Generation, key: BatchKey, seed: int) -> list[bytes]:
        out = io.BytesIO()
        Image.new("L", (8, 8), 128).save(out, format="PNG")
        return [out.getvalue()] * len(generation.seeds)


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
        self.queue: list[int] = []
        self.rejections = 0

    def run(self, requests, key):
        self.batches.append((list(requests), key))
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("sampling failed")
        return [fake_generation(r) for r in requests]

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


def test_full_queue_refuses_with_retry_after():
    key = BatchKey(20, None)
    submissions = [(Request(f"p{i}", 4), key) for i in range(5)]
    recorder, results = run_clients(BatchConfig(max_batch_images=4, wait_s=0.05, max_queued_images=8), submissions)
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 3 and recorder.rejections == 3
    assert all(r.retry_after >= 1 for r in refused)
    assert sum(isinstance(r, Generation) for r in results) == 2


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
