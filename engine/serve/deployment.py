"""The Ray Serve deployment: one replica holds the model once and serves the HTTP API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ray import serve

from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import Generation, Request
from glyph_engine.ray_cluster import keep_replica_grpc_on_loopback
from glyph_engine.serve.api import build_app
from glyph_engine.serve.batcher import BatchConfig, Batcher, BatchKey, GuidanceTooStrong
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings

logger = logging.getLogger(__name__)

# Batch sizes are counted in images; powers of two up to the largest request.
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica needs. Plain values: Ray sends it to every replica."""

    source: ModelSource
    batch: BatchConfig
    token: str | None
    settings: GenerationSettings = GenerationSettings()  # serve's options; a request sets steps and guidance


class RayMetrics:
    """glyph-engine's metrics, exported with Ray Serve's on Ray's Prometheus endpoint
    (summed over replicas by Prometheus, each series labelled with its replica)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._batch = metrics.Histogram(
            "glyph_engine_batch_images",
            description="Images per sampling run, i.e. per U-Net call (x2 rows with guidance).",
            boundaries=BATCH_BOUNDARIES,
        )
        self._seconds = metrics.Histogram(
            "glyph_engine_batch_seconds",
            description="Seconds per sampling run.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
        )
        self._images = metrics.Counter("glyph_engine_images", description="Images generated.")
        self._queue = metrics.Gauge("glyph_engine_queue_images", description="Images waiting for a sampling run.")
        self._sampling = metrics.Gauge("glyph_engine_sampling_images", description="Images in the sampling run now.")
        self._rejected = metrics.Counter(
            "glyph_engine_rejected_requests", description="Requests refused with 503 because the queue was full."
        )
        # Ray exports a gauge only in the report intervals where it was set: an idle queue would
        # vanish from the scrape, so the gauges are set again every second.
        self._queued = 0
        self._sampled = 0
        threading.Thread(target=self._refresh_gauges, name="glyph-metrics", daemon=True).start()

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(1)
            self._queue.set(self._queued)
            self._sampling.set(self._sampled)

    def sampling(self, images: int) -> None:
        self._sampled = images
        self._sampling.set(images)

    def batch_ran(self, images: int, seconds: float) -> None:
        self._batch.observe(images)
        self._seconds.observe(seconds)
        self._images.inc(images)

    def queue_changed(self, images: int) -> None:
        self._queued = images
        self._queue.set(images)

    def rejected(self) -> None:
        self._rejected.inc()


@serve.deployment(name="glyffuser")
@serve.ingress()
class GlyphServer:
    """One replica: the model loaded once, a batcher in front of it, the HTTP API on top."""

    def __init__(self, config: ReplicaConfig) -> None:
        keep_replica_grpc_on_loopback()
        self._session = Session.load(config.source)
        self._config = config
        self._batcher = Batcher(self._run, config.batch, RayMetrics())
        self.max_steps = self._session.max_steps
        # A request without steps takes the model's (a distilled student's few), as generate does.
        self.default_steps = config.settings.resolve(self._session.model).steps

    def __serve_build_asgi_app__(self):
        return build_app(self, self._config.token)

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
            "model_sha256": self._session.model.sha256,
            "backend": self._session.backend.name,
            "precision": self._session.backend.precision,
        }

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self._batcher.alive():
            raise RuntimeError("the batching worker stopped")
