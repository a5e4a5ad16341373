"""The HTTP API of `glyph-engine serve`: request schema, limits, auth and error replies.

No Ray here: `build_app` turns any `Service` into a FastAPI app, so the API is the same on
Ray Serve and in tests. Every error reply is JSON `{"error": "..."}` with a sentence that
says what to fix.
"""

from __future__ import annotations

import base64
import hmac
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glyph_engine import __version__
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import Generation
from glyph_engine.pipeline import Request as GlyphRequest
from glyph_engine.serve.batcher import BatchKey, Overloaded
from glyph_engine.text import check_prompts

MAX_IMAGES = 256  # per request: larger jobs belong to bulk generation (`generate --ray`)
MAX_PROMPT_CHARS = 1000  # T5 truncates at its max length anyway; this bounds the work of tokenizing
MAX_BODY_BYTES = 16 * 1024
MAX_SEED = 2**63 - 1


class GenerateBody(BaseModel):
    """POST /generate: images of one prompt, as `glyph-engine generate PROMPT -n N --seed SEED` draws them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description='An English definition, e.g. "metal".')
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of glyphs.")
    steps: int = Field(20, ge=1, description="DPM-Solver++ steps; 20 looks good, 10 is usable.")
    guidance: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Classifier-free guidance; null: the model's default, 1: off."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Image i's noise depends only on (seed, i).")


class GenerateReply(BaseModel):
    images: list[str] = Field(description="Base64-encoded PNGs, in order.")
    seeds: list[int] = Field(description="Each image's noise seed, derived from (seed, i).")


class Service(Protocol):
    """What the API needs from a model server replica."""

    max_steps: int  # the model's training timesteps

    def healthy(self) -> bool: ...

    def describe(self) -> dict[str, str]: ...

    async def generate(self, request: GlyphRequest, key: BatchKey) -> Generation: ...

    def encode_png(self, generation: Generation, key: BatchKey, seed: int) -> list[bytes]: ...


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for item in e.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "invalid request: " + "; ".join(parts) + " (see /docs for the schema)."


async def _read_body(request: Request) -> bytes | JSONResponse:
    """The body, read up to MAX_BODY_BYTES: a larger one is refused before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return error(413, f"the request body is over {MAX_BODY_BYTES} bytes; send one prompt per request.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return error(413, f"the request body is over {MAX_BODY_BYTES} bytes; send one prompt per request.")
    return bytes(body)


def _parse(body: bytes, max_steps: int) -> GenerateBody | JSONResponse:
    try:
        parsed = GenerateBody.model_validate_json(body)
    except ValidationError as e:
        if any(item["type"] == "json_invalid" for item in e.errors()):
            return error(400, 'the body is not valid JSON; send e.g. {"prompt": "metal", "n": 4}.')
        if any(item["type"] == "model_type" for item in e.errors()):
            return error(400, 'the body must be a JSON object, e.g. {"prompt": "metal", "n": 4}.')
        return error(422, _validation_message(e))
    try:
        check_prompts([parsed.prompt])
    except GlyphEngineError as e:
        return error(422, f"invalid request: {e}")
    if parsed.steps > max_steps:
        return error(422, f"invalid request: steps must be at most {max_steps}, the model's training timesteps.")
    return parsed


def build_app(service: Service, token: str | None) -> FastAPI:
    """The FastAPI app of one replica; `token` set: every route but /healthz and the docs needs it."""
    app = FastAPI(
        title="glyph-engine",
        version=__version__,
        description="Text-to-glyph diffusion: POST a prompt, get PNG glyphs. Concurrent requests share U-Net calls.",
    )
    open_paths = {"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect"}

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(
                    401,
                    "missing or wrong token; send the header 'Authorization: Bearer TOKEN' with serve's --token.",
                    {"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error(422, _validation_message(e))

    @app.get("/healthz", summary="200 once the model is loaded and the batcher runs")
    async def healthz() -> JSONResponse:
        if not service.healthy():
            return error(503, "the model server is not ready.")
        return JSONResponse({"status": "ok", **service.describe()})

    @app.post(
        "/generate",
        summary="Draw glyphs for one prompt",
        response_model=GenerateReply,
        responses={
            400: {"description": "malformed JSON"},
            401: {"description": "missing or wrong token"},
            413: {"description": "body too large"},
            422: {"description": "a field is missing, out of range or unknown"},
            503: {"description": "overloaded: retry after Retry-After seconds"},
        },
        # The body is read and validated by hand (size limit, one error format); the schema is
        # still the documented one.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateBody.model_json_schema()}},
            }
        },
    )
    async def generate(request: Request) -> JSONResponse:
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            return body
        parsed = _parse(body, service.max_steps)
        if isinstance(parsed, JSONResponse):
            return parsed
        key = BatchKey(parsed.steps, parsed.guidance)
        try:
            result = await service.generate(GlyphRequest(parsed.prompt, parsed.n, parsed.seed), key)
        except Overloaded as e:
            return error(503, f"{e}.", {"Retry-After": str(e.retry_after)})
        except GlyphEngineError as e:
            return error(500, str(e))
        images = [base64.b64encode(png).decode("ascii") for png in service.encode_png(result, key, parsed.seed)]
        return JSONResponse({"images": images, "seeds": result.seeds})

    return app
