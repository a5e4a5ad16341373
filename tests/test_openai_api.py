"""The OpenAI images API, driven by the official `openai` client against a real HTTP server."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from serving import in_process  # noqa: E402

from glyph_engine.pipeline import Request  # noqa: E402
from glyph_engine.serve.batcher import BatchConfig, BatchKey, GuidanceTooStrong  # noqa: E402

from fake_service import FakeService, NoMetrics  # noqa: E402

TOKEN = "openai-test-token"


@pytest.fixture(scope="module")
def fake():
    service = FakeService()
    with in_process(service, TOKEN) as url:
        yield service, openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_models_lists_the_served_model(fake):
    service, client = fake
    assert [m.id for m in client.models.list().data] == [service.model_id]
    assert client.models.retrieve(service.model_id).owned_by == "glyph-engine"


def test_images_generate_with_openais_fields_and_glyph_engines_extras(fake):
    service, client = fake
    service.calls.clear()
    reply = client.images.generate(
        model=service.model_id,
        prompt="metal",
        n=3,
        size="8x8",
        response_format="b64_json",
        user="someone",
        extra_body={"steps": 7, "guidance": 2.5, "seed": 4},
    )
    assert abs(reply.created - time.time()) < 60 and len(reply.data) == 3
    assert all(pixels(d.b64_json).shape == (8, 8) for d in reply.data)
    # The same batcher key and request /generate makes of these values.
    assert service.calls == [(Request("metal", 3, 4), BatchKey(7, 2.5))]
    service.calls.clear()
    client.images.generate(prompt="metal")  # every field but the prompt defaulted
    assert service.calls == [(Request("metal", 1, 0), BatchKey(service.default_steps, None))]


@pytest.mark.parametrize(
    ("options", "error", "param", "words"),
    [
        ({"response_format": "url"}, "BadRequestError", "response_format", "b64_json"),
        ({"size": "1024x1024"}, "BadRequestError", "size", "8x8 glyphs only"),
        ({"model": "dall-e-3"}, "NotFoundError", "model", "dall-e-3 is not served here"),
        ({"quality": "hd"}, "BadRequestError", "quality", "unsupported parameter: quality"),
        ({"n": 257}, "BadRequestError", "n", "at most 256"),
        ({"extra_body": {"steps": 0}}, "BadRequestError", "steps", "greater than or equal to 1"),
        ({"prompt": "\x00"}, "BadRequestError", "prompt", "no printable character"),
    ],
    ids=["url", "size", "model", "unknown-field", "n", "steps", "prompt"],
)
def test_unsupported_values_are_4xx_in_openais_shape(fake, options, error, param, words):
    _, client = fake
    with pytest.raises(getattr(openai, error)) as raised:
        client.images.generate(**{"prompt": "metal", **options})
    assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"
    assert words in raised.value.message


def test_a_wrong_key_is_401_an_overload_503_and_too_strong_guidance_400(fake):
    service, client = fake
    with pytest.raises(openai.AuthenticationError) as raised:
        client.with_options(api_key="wrong").images.generate(prompt="metal")
    assert raised.value.body["code"] == "invalid_api_key"
    service.overloaded = True
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            client.images.generate(prompt="metal")
    finally:
        service.overloaded = False
    assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "7"
    service.fails = GuidanceTooStrong(50.0, 4.0)
    try:
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.generate(prompt="metal", extra_body={"guidance": 50})
    finally:
        service.fails = None
    assert raised.value.body["param"] == "guidance" and "50" in raised.value.message


@pytest.mark.parametrize("which", ["embedded", "diffusers-folder"])
def test_the_openai_client_draws_what_the_python_api_draws(which, glyffuser_folder, t5_folder):
    import glyph_engine
    from glyph_engine.model import DEFAULT_MODEL
    from glyph_engine.serve.service import ModelService, ReplicaConfig
    from glyph_engine.session import ModelSource

    if which == "embedded":
        options = {"ckpt": None, "backend": "auto", "precision": "fp32"}
    else:
        options = {"ckpt": glyffuser_folder, "backend": "torch", "precision": "auto", "text_encoder": str(t5_folder)}
    service = ModelService(ReplicaConfig(ModelSource(**options), BatchConfig(), token=None), NoMetrics())
    with in_process(service, None) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        name = DEFAULT_MODEL if which == "embedded" else glyffuser_folder.name
        assert client.models.list().data[0].id == name
        reply = client.images.generate(model=name, prompt="water", n=2, extra_body={"steps": 3, "seed": 9})
    expected = glyph_engine.load(**options)("water", n=2, steps=3, seed=9).array
    got = np.stack([pixels(d.b64_json) for d in reply.data])
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1
