"""The Python API: load a model once, then draw glyphs from a notebook or a script.

    import glyph_engine
    pipe = glyph_engine.load()                      # the embedded model, the fastest backend here
    glyphs = pipe("metal", n=16, seed=0)            # the images `glyph-engine generate metal -n 16` draws
    glyphs.grid()                                   # a PIL image; a notebook shows `glyphs` as this grid

It is the CLI's path (`Session`, the same settings and defaults), so a call draws exactly
what `glyph-engine generate` draws with the same options.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from glyph_engine.commands import MAX_IMAGES
from glyph_engine.errors import GlyphEngineError
from glyph_engine.images import grid, png_bytes, save_png, to_uint8
from glyph_engine.pipeline import Generation, Request
from glyph_engine.schedule import SamplerConfig
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import BackendName, GenerationSettings, Precision
from glyph_engine.text import check_prompts

__all__ = ["Glyphs", "Pipeline", "Request", "load"]


@dataclass(frozen=True)
class Glyphs:
    """The glyphs of one call, in order: prompt by prompt, `per_prompt` glyphs each."""

    array: np.ndarray  # (N, H, W) uint8, white background 255
    prompts: tuple[str, ...]  # per glyph
    seeds: tuple[int, ...]  # per glyph: its noise depends on this alone
    per_prompt: int  # glyphs per prompt: one row block each in the grid
    metadata: dict[str, object]  # what `generate`'s grid PNG records (settings, model, backend)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[index])

    @property
    def images(self) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.array]

    def grid(self) -> Image.Image:
        """All glyphs tiled as `generate -o` tiles them: one row block per prompt."""
        return Image.fromarray(self._grid_pixels())

    def save(self, path: str | Path) -> None:
        """The grid as a PNG with its metadata, written atomically: `generate -o path`'s file."""
        save_png(self._grid_pixels(), Path(path), self.metadata)

    def _grid_pixels(self) -> np.ndarray:
        return grid(self.array, self.per_prompt)

    def _repr_png_(self) -> bytes:  # Jupyter shows a result as its grid
        return png_bytes(self._grid_pixels(), self.metadata)


class Pipeline:
    """A loaded model on a backend. Calls from several threads are safe: they run one at a
    time (a backend holds one set of buffers), each drawing what it would draw alone."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self._session.backend.name

    @property
    def precision(self) -> str:
        return self._session.backend.precision

    @property
    def model_sha256(self) -> str:
        return self._session.model.sha256

    def __call__(
        self,
        prompt: str | Sequence[str],
        n: int = 16,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str = "dpmpp-2m",
        order: int | None = None,
        batch_size: int | None = None,
    ) -> Glyphs:
        """`n` glyphs for each prompt. None: the checkpoint's default (steps, guidance,
        interval), as `generate`'s options; `seed` makes the glyphs reproducible."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_prompts(prompts)
        _check_count(n, "n")
        settings = _settings(steps, guidance, seed, guidance_interval, sampler, order, batch_size)
        with self._lock:
            result = self._session.generate(prompts, n, settings)
        return self._glyphs(result, n, {"prompts": prompts})

    def requests(
        self,
        requests: Sequence[Request],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str = "dpmpp-2m",
        order: int | None = None,
        batch_size: int | None = None,
    ) -> list[Glyphs]:
        """Many (prompt, count, seed) requests in shared U-Net calls, as a bulk job runs them:
        each request's glyphs are those `pipe(prompt, count, seed=seed)` draws."""
        if not requests:
            raise GlyphEngineError("no requests; give at least one Request(prompt, count, seed).")
        check_prompts([r.prompt for r in requests])
        for r in requests:
            _check_count(r.count, "a request's count")
        settings = _settings(steps, guidance, 0, guidance_interval, sampler, order, batch_size)
        with self._lock:
            results = self._session.generate_requests(requests, settings)
        return [self._glyphs(g, r.count, {"prompts": [r.prompt]}) for g, r in zip(results, requests, strict=True)]

    def _glyphs(self, result: Generation, per_prompt: int, extra: dict[str, object]) -> Glyphs:
        return Glyphs(
            to_uint8(result.images),
            tuple(result.prompts),
            tuple(result.seeds),
            per_prompt,
            {**extra, **self._session.metadata(result)},
        )


def load(
    ckpt: str | Path | None = None,
    *,
    backend: str = "auto",
    precision: str = "auto",
    text_encoder: str | None = None,
    export_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Pipeline:
    """Loads a model for drawing: a glyph-engine checkpoint, a glyffuser diffusers folder or an
    embedded model's name (None: the embedded default), on `backend` ("auto": the fastest
    here) in `precision`, as `glyph-engine generate --ckpt ... --backend ... --precision ...`
    does. Compiled models are kept in `cache_dir` between runs, as the CLI keeps them."""
    source = ModelSource(
        ckpt=None if ckpt is None else Path(ckpt),
        text_encoder=text_encoder,
        backend=_choice(BackendName, backend, "backend"),
        export_dir=None if export_dir is None else Path(export_dir),
        precision=_choice(Precision, precision, "precision"),
        cache_dir=None if cache_dir is None else Path(cache_dir),
    )
    source.check()
    return Pipeline(Session.load(source))


def _choice(kind, value: str, what: str):
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(k.value for k in kind)
        raise GlyphEngineError(f"{what} must be one of {names} (got {value!r}).") from None


def _check_count(count: int, what: str) -> None:
    if not (isinstance(count, int) and 1 <= count <= MAX_IMAGES):
        raise GlyphEngineError(f"{what} must be from 1 to {MAX_IMAGES} glyphs (got {count!r}).")


def _settings(
    steps: int | None,
    guidance: float | None,
    seed: int,
    guidance_interval: tuple[float, float] | None,
    sampler: str,
    order: int | None,
    batch_size: int | None,
) -> GenerationSettings:
    settings = GenerationSettings(
        steps=steps,
        guidance=None if guidance is None else float(guidance),  # 6 and 6.0 record alike, as the CLI's
        seed=seed,
        batch_size=batch_size,
        sampler=SamplerConfig(name=sampler, order=order),
        guidance_interval=None if guidance_interval is None else tuple(map(float, guidance_interval)),
    )
    settings.validate()
    return settings
