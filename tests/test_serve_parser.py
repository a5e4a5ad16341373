"""Property-based tests of serve's request parser: whatever a client sends, the answer is a
request within the documented limits or a JSON error with a 4xx status, never an exception."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient

from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from glyph_engine.serve.api import (  # noqa: E402
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerateBody,
    _parse,
    build_app,
)
from glyph_engine.settings import MAX_GUIDANCE  # noqa: E402

from fake_service import FakeService  # noqa: E402

MAX_STEPS = 1000
FIELDS = ["prompt", "n", "steps", "guidance", "seed"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # NaN and infinities too
    | st.sampled_from([0, 1, 256, 257, 1000, 1001, MAX_SEED, MAX_SEED + 1, 1e308, -0.0, 100.0, 100.0000001])
    | st.text()
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=1100)
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
)
# Objects with the real fields (each a plausible or hostile value) and sometimes unknown ones.
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=7)
plausible = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=MAX_PROMPT_CHARS + 5)},
    optional={
        "n": st.integers(-2, MAX_IMAGES + 2),
        "steps": st.integers(-2, MAX_STEPS + 2),
        "guidance": st.none() | st.floats(-1, MAX_GUIDANCE * 2),
        "seed": st.integers(-2, MAX_SEED + 2),
    },
)


def encode(value: object) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity as JSON5 literals, as careless clients send them


bodies = (
    plausible.map(encode)
    | objects.map(encode)
    | values.map(encode)
    | st.binary(max_size=200)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
)


def check_within_limits(parsed: GenerateBody) -> None:
    assert isinstance(parsed.prompt, str) and 1 <= len(parsed.prompt) <= MAX_PROMPT_CHARS
    assert any(c.isprintable() and not c.isspace() for c in parsed.prompt)
    assert type(parsed.n) is int and 1 <= parsed.n <= MAX_IMAGES
    assert parsed.steps is None or (type(parsed.steps) is int and 1 <= parsed.steps <= MAX_STEPS)  # None: the model's
    assert parsed.guidance is None or (math.isfinite(parsed.guidance) and 0 <= parsed.guidance <= MAX_GUIDANCE)
    assert type(parsed.seed) is int and 0 <= parsed.seed <= MAX_SEED


@given(bodies)
@settings(max_examples=600, deadline=None)
@example(b"[" * 100_000)  # nested past any recursion limit
@example(b'{"prompt": "a", "guidance": 1e308}')
@example(b'{"prompt": "\\u0000\\u0001"}')
@example(b'{"prompt": "a", "n": 1e2}')
@example(b'{"prompt": "a", "prompt": 5}')
@example(b'{"prompt": "a", "steps": 99999999999999999999999999}')
def test_parse_gives_a_request_within_limits_or_a_4xx_json_error(body):
    parsed = _parse(body, MAX_STEPS)
    if isinstance(parsed, JSONResponse):
        assert parsed.status_code in (400, 422)
        error = json.loads(parsed.body)["error"]
        assert isinstance(error, str) and error.endswith(".")
    else:
        check_within_limits(parsed)


@pytest.fixture(scope="module")
def client():
    return TestClient(build_app(FakeService(), token=None))


@given(body=bodies | st.binary(min_size=MAX_BODY_BYTES - 10, max_size=MAX_BODY_BYTES + 10))
@settings(max_examples=200, deadline=None)
def test_the_api_answers_any_body_with_images_or_a_4xx_json_error(client, body):
    reply = client.post("/generate", content=body, headers={"content-type": "application/json"})
    if reply.status_code == 200:
        check_within_limits(GenerateBody.model_validate_json(body))
    else:
        assert reply.status_code in (400, 413, 422)
        assert isinstance(reply.json()["error"], str)
