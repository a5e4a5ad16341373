"""A model service without a model, behind the real HTTP API (tests of serve without Ray)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from PIL import Image

from glyph_engine.pipeline import Generation, Request
from glyph_engine.serve.batcher import BatchKey, Overloaded
from glyph_engine.settings import StepImpl


def fake_generation(request: Request) -> Generation:
    return Generation(
        images=torch.full((request.count, 1, 8, 8), 0.5),
        prompts=[request.prompt] * request.count,
        seeds=list(range(request.first, request.first + request.count)),
        settings=SimpleNamespace(seed=request.seed),
        step_impl=StepImpl.torch,
    )


class NoMetrics:
    """A batcher's metrics, dropped: for real services served in-process."""

    def sampling(self, images: int) -> None: ...

    def batch_ran(self, images: int, seconds: float) -> None: ...

    def queue_changed(self, images: int) -> None: ...

    def rejected(self) -> None: ...


class FakeService:
    max_steps = 1000
    default_steps = 20
    model_id = "fake-glyffuser"
    size = "8x8"

    def __init__(self) -> None:
        self.calls: list[tuple[Request, BatchKey]] = []
        self.overloaded = False
        self.fails: Exception | None = None

    def healthy(self) -> bool:
        return True

    def describe(self) -> dict[str, str]:
        return {"backend": "fake"}

    async def generate(self, request: Request, key: BatchKey) -> Generation:
        if self.overloaded:
            raise Overloaded(7)
        if self.fails is not None:
            raise self.fails
        self.calls.append((request, key))
        return fake_generation(request)

    def encode_png(self, generation: Generation) -> list[bytes]:
        out = io.BytesIO()
        Image.new("L", (8, 8), 128).save(out, format="PNG")
        return [out.getvalue()] * len(generation.seeds)
