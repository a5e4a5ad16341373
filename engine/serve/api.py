"""The HTTP API of `glyph-engine serve`: request schema, limits, auth and error replies.

No Ray here: `build_app` turns any `Service` into a FastAPI app (with the OpenAI images
routes of `openai_api.py`), so the API is the same on Ray Serve and in tests, and
`ProxyGuard` wraps Ray Serve's HTTP proxy in front of it. Every error reply is JSON
`{"error": "..."}` (OpenAI's shape under /v1/) with a sentence that says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from glyph_engine import __version__
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import Generation
from glyph_engine.pipeline import Request as GlyphRequest
from glyph_engine.serve.batcher import BatchKey
from glyph_engine.serve.draw import Refusal, draw
from glyph_engine.serve.openai_api import PREFIX as OPENAI_PREFIX
from glyph_engine.serve.openai_api import add_openai_routes, openai_error
from glyph_engine.settings import MAX_GUIDANCE
from glyph_engine.text import check_prompts

logger = logging.getLogger(__name__)

MAX_IMAGES = 256  # per request: larger jobs belong to bulk generation (`generate --ray`)
MAX_PROMPT_CHARS = 1000  # T5 truncates at its max length anyway; this bounds the work of tokenizing
MAX_BODY_BYTES = 16 * 1024
MAX_SEED = 2**63 - 1
TOO_LARGE = f"the request body is over {MAX_BODY_BYTES} bytes; send one prompt per request."
# GET /: a page to type a prompt and see the glyphs (page.html: no external assets, no build step).
_PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")


class GenerateBody(BaseModel):
    """POST /generate: images of one prompt, as `glyph-engine generate PROMPT -n N --seed SEED` draws them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description='An English definition, e.g. "metal".')
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of glyphs.")
    steps: int | None = Field(
        None,
        ge=1,
        description="Sampler steps; null: the model's (the embedded default's 8, glyffuser-small's 14, "
        "20 for a glyffuser, a distilled student's few).",
    )
    guidance: float | None = Field(
        None,
        ge=0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Classifier-free guidance; null: the model's default, 1: off.",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Image i's noise depends only on (seed, i).")


class GenerateReply(BaseModel):
    images: list[str] = Field(description="Base64-encoded PNGs, in order.")
    seeds: list[int] = Field(description="Each image's noise seed, derived from (seed, i).")


class Service(Protocol):
    """What the API needs from a model server replica."""

    max_steps: int  # the model's training timesteps
    default_steps: int  # what a request without steps gets
    model_id: str  # the model's name, as /v1/models lists it
    size: str  # the glyphs' "WxH"

    def healthy(self) -> bool: ...

    def describe(self) -> dict[str, str]: ...

    async def generate(self, request: GlyphRequest, key: BatchKey) -> Generation: ...

    def encode_png(self, generation: Generation) -> list[bytes]: ...


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
        return error(413, TOO_LARGE)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return error(413, TOO_LARGE)
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
    if parsed.steps is not None and parsed.steps > max_steps:
        return error(422, f"invalid request: steps must be at most {max_steps}, the model's training timesteps.")
    return parsed


def build_app(service: Service, token: str | None) -> FastAPI:
    """The FastAPI app of one replica; `token` set: every route but /healthz and the docs needs it."""
    app = FastAPI(
        title="glyph-engine",
        version=__version__,
        description="Text-to-glyph diffusion: POST a prompt, get PNG glyphs. Concurrent requests share U-Net calls.",
    )
    # The page asks for the token itself; it holds no data.
    open_paths = {"/", "/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
    page = _PAGE.replace("__TOKEN_REQUIRED__", "true" if token is not None else "false")

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                message = "missing or wrong token; send the header 'Authorization: Bearer TOKEN' with serve's --token."
                headers = {"WWW-Authenticate": "Bearer"}
                if request.url.path.startswith(OPENAI_PREFIX):  # an OpenAI client's API key
                    return openai_error(401, message, code="invalid_api_key", headers=headers)
                return error(401, message, headers)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith(OPENAI_PREFIX):
            return openai_error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(OPENAI_PREFIX):
            return openai_error(400, _validation_message(e))
        return error(422, _validation_message(e))

    @app.get("/", include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

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
        result = await draw(service, parsed.prompt, parsed.n, parsed.seed, parsed.steps, parsed.guidance)
        if isinstance(result, Refusal):
            message = f"invalid request: {result.message}" if result.status == 422 else result.message
            return error(result.status, message, result.headers)
        images = [base64.b64encode(png).decode("ascii") for png in service.encode_png(result)]
        return JSONResponse({"images": images, "seeds": result.seeds})

    add_openai_routes(app, service, MAX_IMAGES, _read_body)
    return app


# Ray Serve's HTTP proxy (uvicorn) reads a request's body only as the replica asks for it, so
# a client that sends headers and then trickles its body holds one of the replica's
# `max_ongoing_requests` for as long as it likes: a thousand of them and every request,
# /healthz too, got Serve's plain-text 503. `ProxyGuard` runs in the proxy and reads each
# body there first, against a deadline and per-client and total caps; only whole bodies reach
# a replica.
BODY_TIMEOUT_S = 10.0  # to send a whole body (16 KB at most); a client still sending after this gets 408
MAX_READING = 1024  # bodies being read at once, all clients together: bounds the proxy's memory
MAX_READING_PER_CLIENT = 32  # ...and from one client address, so one client cannot take all of them
GUESS_RETRY_AFTER_S = 2  # Retry-After on Serve's own 503s, which come with no estimate


class ProxyGuard:
    """ASGI middleware in Ray Serve's HTTP proxy (see `proxy_middlewares`), in front of every
    replica: reads request bodies against a deadline and caps, and turns the proxy's own
    plain-text error replies (no replica, timeout, a replica that died mid-request) into this
    API's JSON `{"error": ...}`.

    The client address is the TCP peer's; uvicorn replaces it with X-Forwarded-For only for
    connections from 127.0.0.1 (a reverse proxy on this machine). A connection that never
    finishes its headers is not seen here: Serve's uvicorn has no header timeout to set, so it
    holds one socket until the client goes (1,200 of them left the service unaffected).
    """

    def __init__(
        self,
        app: Any,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_reading: int = MAX_READING,
        max_reading_per_client: int = MAX_READING_PER_CLIENT,
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.max_reading = max_reading
        self.max_reading_per_client = max_reading_per_client
        self._reading: Counter[str] = Counter()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reply = _JsonErrors(send)
        if _has_body(scope):
            body = await self._read(scope, receive, reply)
            if body is None:  # answered already, or the client left
                return
            receive = _replay(body, receive)
        try:
            await self.app(scope, receive, reply)
        except Exception:  # noqa: BLE001 - the client gets JSON; the proxy's log gets the traceback
            logger.exception("the proxy failed on %s %s", scope.get("method"), scope.get("path"))
        if not reply.started:
            # Serve sends nothing when the replica died or failed mid-request; uvicorn would
            # answer a plain-text 500.
            await reply.json(500, "the model server failed while handling this request; retry it.")

    async def _read(self, scope: dict, receive: Any, reply: _JsonErrors) -> bytes | None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await reply.refuse(413, TOO_LARGE)
            return None
        client = (scope.get("client") or ("unknown",))[0]
        if self._reading.total() >= self.max_reading:
            await reply.refuse(
                503,
                f"the server is receiving {self.max_reading} request bodies; retry in {GUESS_RETRY_AFTER_S} s.",
                {"retry-after": str(GUESS_RETRY_AFTER_S)},
            )
            return None
        if self._reading[client] >= self.max_reading_per_client:
            await reply.refuse(
                429,
                f"{client} is still sending {self.max_reading_per_client} request bodies; finish those first.",
                {"retry-after": str(GUESS_RETRY_AFTER_S)},
            )
            return None
        self._reading[client] += 1
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > MAX_BODY_BYTES:
                        await reply.refuse(413, TOO_LARGE)
                        return None
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            await reply.refuse(
                408,
                f"the request body did not arrive within {self.body_timeout_s:g} s; send it all at once.",
            )
            return None
        finally:
            self._reading[client] -= 1
            if not self._reading[client]:
                del self._reading[client]


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy calls this at start (`serve` names it in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyGuard)]


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: dict) -> bool:
    length = _header(scope, b"content-length")
    return (length is not None and length.strip() != "0") or _header(scope, b"transfer-encoding") is not None


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that gives the body read already, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# Serve's own error replies, as sentences that say what to do.
_PROXY_ERRORS = {
    404: "the glyph-engine application is not deployed (starting or stopping); retry in a few seconds.",
    408: "the request was not answered in time; retry it, or ask for fewer images.",
    500: "the model server failed while handling this request; retry it.",
    503: "the server is busy or has no replica ready; retry in {retry_after} s.",
}


class _JsonErrors:
    """The proxy's `send`, with every error reply that is not JSON already rewritten as JSON."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._held: dict | None = None  # a non-JSON error's start, waiting for its body
        self._text = bytearray()
        self.started = False

    async def refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """A refusal before the body was read: the connection closes, as what follows is unread body."""
        await self.json(status, message, {**(headers or {}), "connection": "close"})

    async def json(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": fields})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            content_type = dict(message.get("headers", ())).get(b"content-type", b"")
            if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                self._held = message
                return
        elif message["type"] == "http.response.body" and self._held is not None:
            self._text += message.get("body", b"")
            if message.get("more_body", False):
                return
            await self._rewrite()
            return
        await self._send(message)

    async def _rewrite(self) -> None:
        assert self._held is not None
        status = self._held["status"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._held.get("headers", ())}
        kept = {k: v for k, v in headers.items() if k in ("retry-after", "www-authenticate", "allow", "connection")}
        if status == 503:
            kept.setdefault("retry-after", str(GUESS_RETRY_AFTER_S))
        text = self._text.decode("utf-8", "replace").strip()
        logger.info("the proxy answered %d: %s", status, text)
        known = _PROXY_ERRORS.get(status)
        message = (
            known.format(retry_after=kept.get("retry-after"))
            if known
            else f"{text.rstrip('.') or 'the request failed'} (HTTP {status})."
        )
        await self.json(status, message, kept)
