"""The OpenAI images API on `glyph-engine serve`: `POST /v1/images/generations` and
`GET /v1/models`, so clients written for OpenAI draw glyphs unchanged.

The same service, batcher, limits and token as `POST /generate`; only the shapes differ.
Fields glyph-engine needs beyond OpenAI's (steps, guidance, seed) come as extra body fields
(`extra_body` in the official client). Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which its clients turn into exceptions.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glyph_engine.errors import GlyphEngineError
from glyph_engine.serve.draw import Refusal, draw
from glyph_engine.settings import MAX_GUIDANCE
from glyph_engine.text import check_prompts

if TYPE_CHECKING:
    from glyph_engine.serve.api import Service

PREFIX = "/v1/"
OWNER = "glyph-engine"


class ImagesBody(BaseModel):
    """POST /v1/images/generations, as OpenAI defines it, plus steps, guidance and seed."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description='An English definition, e.g. "metal".')
    model: str | None = Field(None, description="The served model's id (GET /v1/models); null: that one.")
    n: int = Field(1, ge=1, description="Number of glyphs.")
    size: str | None = Field(None, description='The model\'s own size only, e.g. "32x32"; null: that one.')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json only (glyph-engine keeps no files to link to)."
    )
    user: str | None = Field(None, description="Accepted, not used.")
    steps: int | None = Field(None, ge=1, description="Extra field: sampler steps; null: the model's.")
    guidance: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Extra field: guidance; null: the model's."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Extra field: image i's noise depends only on (seed, i).")


IMAGES_SCHEMA = ImagesBody.model_json_schema()


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def add_openai_routes(
    app: FastAPI, service: Service, max_images: int, read_body: Callable[[Request], Awaitable[bytes | JSONResponse]]
) -> None:
    """The routes on `app`, served by `service` (the API's `Service`); `read_body` reads a
    body against the API's size limit (a JSONResponse when refused)."""

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": 0, "owned_by": OWNER}

    @app.get("/v1/models", summary="OpenAI: the served model")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id}", summary="OpenAI: one model")
    async def model(model_id: str) -> JSONResponse:
        if model_id != service.model_id:
            return _unknown_model(model_id, service.model_id)
        return JSONResponse(model_card())

    @app.post(
        "/v1/images/generations",
        summary="OpenAI: draw glyphs for one prompt",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": IMAGES_SCHEMA}}}},
    )
    async def images(request: Request) -> JSONResponse:
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return openai_error(body.status_code, _message(body))
        parsed = _parse(body, service, max_images)
        if isinstance(parsed, JSONResponse):
            return parsed
        result = await draw(service, parsed.prompt, parsed.n, parsed.seed, parsed.steps, parsed.guidance)
        if isinstance(result, Refusal):
            # OpenAI says 400 for a bad value, whichever field: here the guidance was too strong.
            status, param = (400, "guidance") if result.status == 422 else (result.status, None)
            code = "overloaded" if result.status == 503 else None
            return openai_error(status, result.message, param, code, result.headers)
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in service.encode_png(result)]
        return JSONResponse({"created": int(time.time()), "data": data})


def _parse(body: bytes, service: Service, max_images: int) -> ImagesBody | JSONResponse:
    try:
        parsed = ImagesBody.model_validate_json(body)
    except ValidationError as e:
        item = e.errors()[0]
        if item["type"] in ("json_invalid", "model_type"):
            return openai_error(400, 'the body must be a JSON object, e.g. {"prompt": "metal", "n": 4}.')
        param = ".".join(str(p) for p in item.get("loc", ()))
        if item["type"] == "extra_forbidden":
            return openai_error(400, f"unsupported parameter: {param}.", param=param, code="unknown_parameter")
        return openai_error(400, f"invalid {param}: {item['msg']}.", param=param, code="invalid_value")
    try:
        check_prompts([parsed.prompt])
    except GlyphEngineError as e:
        return openai_error(400, str(e), param="prompt", code="invalid_value")
    if parsed.model is not None and parsed.model != service.model_id:
        return _unknown_model(parsed.model, service.model_id)
    if parsed.response_format == "url":
        return openai_error(
            400, "response_format url is not supported; ask for b64_json.", "response_format", "invalid_value"
        )
    if parsed.size is not None and parsed.size != service.size:
        return openai_error(
            400, f"this model draws {service.size} glyphs only (got size {parsed.size}).", "size", "invalid_value"
        )
    if parsed.n > max_images:
        return openai_error(400, f"n must be at most {max_images} per request (got {parsed.n}).", "n", "invalid_value")
    if parsed.steps is not None and parsed.steps > service.max_steps:
        return openai_error(
            400, f"steps must be at most {service.max_steps}, the model's training timesteps.", "steps", "invalid_value"
        )
    return parsed


def _unknown_model(asked: str, served: str) -> JSONResponse:
    return openai_error(
        404, f"the model {asked} is not served here; this server serves {served}.", "model", "model_not_found"
    )


def _message(response: JSONResponse) -> str:
    """The sentence of one of the API's own `{"error": "..."}` replies."""
    return json.loads(response.body)["error"]
