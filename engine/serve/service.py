"""One model server without Ray: the model loaded once, a batcher in front of it. The Ray Serve
replica (`deployment.py`) is this plus Ray's metrics and health checks; tests and in-process
servers use it as it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import Generation, Request
from glyph_engine.serve.batcher import BatchConfig, Batcher, BatchKey, BatchMetrics, GuidanceTooStrong
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica needs. Plain values: Ray sends it to every replica."""

    source: ModelSource
    batch: BatchConfig
    token: str | None
    settings: GenerationSettings = GenerationSettings()  # serve's options; a request sets steps and guidance


class ModelService:
    """The `Service` the HTTP API (`api.build_app`) serves: one model, requests batched together."""

    def __init__(self, config: ReplicaConfig, metrics: BatchMetrics) -> None:
        self._session = Session.load(config.source)
        self._config = config
        self._batcher = Batcher(self._run, config.batch, metrics)
        self.max_steps = self._session.max_steps
        # A request without steps takes the model's (the embedded default's 8, glyffuser-small's 14), as generate does.
        self.default_steps = config.settings.resolve(self._session.model).steps
        self.model_id = config.source.name
        _, height, width = self._session.model.image_shape
        self.size = f"{width}x{height}"

    def _run(self, requests: Sequence[Request], key: BatchKey) -> list[Generation]:
        settings = replace(
            self._config.settings,
            steps=key.steps,
            guidance=key.guidance,
            batch_size=self._config.batch.max_batch_images,
        )
        try:
            return self._session.generate_requests(requests, settings)
        except GlyphEngineError as e:
            # The API refused every other bad setting before the run, so this is a run that gave
            # NaN or infinite values: past the model's own guidance, the client's guidance did it.
            default = self._session.model.default_guidance
            if key.guidance is not None and key.guidance > default:
                raise GuidanceTooStrong(key.guidance, default) from e
            raise

    async def generate(self, request: Request, key: BatchKey) -> Generation:
        return await self._batcher.submit(request, key)

    def encode_png(self, generation: Generation) -> list[bytes]:
        return self._session.pngs(generation)

    def healthy(self) -> bool:
        return self._batcher.alive()

    def describe(self) -> dict[str, str]:
        return {
            "model": self.model_id,
            "model_sha256": self._session.model.sha256,
            "backend": self._session.backend.name,
            "precision": self._session.backend.precision,
        }
