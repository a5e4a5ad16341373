"""The Ray Serve deployment: one replica holds the model once and serves the HTTP API."""

from __future__ import annotations

import threading
import time

from ray import serve

from glyph_engine.ray_cluster import keep_replica_grpc_on_loopback
from glyph_engine.serve.api import build_app
from glyph_engine.serve.service import ModelService, ReplicaConfig

# Batch sizes are counted in images; powers of two up to the largest request.
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


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
class GlyphServer(ModelService):
    """One replica: a `ModelService` with Ray's metrics, the HTTP API on top."""

    def __init__(self, config: ReplicaConfig) -> None:
        keep_replica_grpc_on_loopback()
        super().__init__(config, RayMetrics())

    def __serve_build_asgi_app__(self):
        return build_app(self, self._config.token)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self._batcher.alive():
            raise RuntimeError("the batching worker stopped")
