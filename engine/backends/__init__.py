"""Denoiser backends; each implements `glyph_engine.backend.Backend`."""

from __future__ import annotations

from typing import Literal

from glyph_engine.backend import Backend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser

BackendName = Literal["auto", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "torch")


def create_backend(name: str, model: Glyffuser, device: str | None = None) -> Backend:
    """The named backend for `model`; "auto" picks the fastest one available here."""
    if name in ("auto", "torch"):
        from glyph_engine.backends.pytorch import TorchBackend

        return TorchBackend(model, device)
    raise GlyphEngineError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
