"""Cross-client request batching inside one server replica.

Requests wait in one queue; a single worker takes the oldest and every queued request that
can share its sampling run (same steps and guidance), up to a number of images, and runs
them together in a thread while the event loop keeps accepting requests. The queue is
bounded in images: past the bound a request is refused at once (the API answers 503) rather
than waiting behind minutes of work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from glyph_engine.pipeline import Generation, Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one sampling loop."""

    steps: int
    guidance: float | None


class Overloaded(Exception):
    """The queue is full; `retry_after` is a guess, in whole seconds, of when it has room."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class GuidanceTooStrong(Exception):
    """A run with the client's guidance gave NaN or infinite values: the client should lower it."""

    def __init__(self, guidance: float, default: float) -> None:
        super().__init__(
            f"sampling at guidance {guidance:g} overflowed to NaN or infinite values; send a lower guidance "
            f"(the model's default is {default:g})"
        )


class BatchMetrics(Protocol):
    """Where the batcher reports what it does (Prometheus through Ray, or a test's record)."""

    def sampling(self, images: int) -> None: ...  # images in the run now; 0 once it ended

    def batch_ran(self, images: int, seconds: float) -> None: ...

    def queue_changed(self, images: int) -> None: ...

    def rejected(self) -> None: ...


# Runs requests of one key together; returns one Generation per request.
RunBatch = Callable[[Sequence[Request], BatchKey], list[Generation]]


@dataclass
class _Pending:
    request: Request
    key: BatchKey
    future: asyncio.Future[Generation]
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_images: int = 32  # images per sampling run (x2 rows with guidance); 1 turns batching off
    wait_s: float = 0.01  # how long a run waits for more requests once one arrived
    max_queued_images: int = 512  # beyond this, requests get 503 + Retry-After


class Batcher:
    """Groups concurrent requests into shared sampling runs; results stay per request."""

    def __init__(self, run: RunBatch, config: BatchConfig, metrics: BatchMetrics) -> None:
        self._run = run
        self._config = config
        self._metrics = metrics
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glyph-batch")
        # Measured on the last run; feeds Retry-After. Per image and step, as a run's time grows
        # with both and the queue may wait for more steps than the last run had.
        self._seconds_per_image_step = 0.0
        self._worker: asyncio.Task[None] | None = None  # started in the loop of the first `submit`

    @property
    def queued_images(self) -> int:
        return sum(p.request.count for p in self._queue)

    def alive(self) -> bool:
        return self._worker is None or not self._worker.done()

    async def submit(self, request: Request, key: BatchKey) -> Generation:
        """Waits for the request's images; raises Overloaded at once when the queue is full."""
        queued = self.queued_images
        if queued and queued + request.count > self._config.max_queued_images:
            self._metrics.rejected()
            work = sum(p.request.count * p.key.steps for p in self._queue)
            raise Overloaded(max(1, math.ceil(work * self._seconds_per_image_step)))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        pending = _Pending(request, key, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._metrics.queue_changed(self.queued_images)
        self._arrived.set()
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        """The oldest request and the queued ones that can join it, oldest first."""
        key = self._queue[0].key
        taken, images = [], 0
        for pending in self._queue:
            if pending.key != key:
                continue
            if taken and images + pending.request.count > self._config.max_batch_images:
                break
            taken.append(pending)
            images += pending.request.count
        for pending in taken:
            self._queue.remove(pending)
        self._metrics.queue_changed(self.queued_images)
        return taken

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # Give concurrent clients a moment to join, unless a full batch is already waiting.
            if self.queued_images < self._config.max_batch_images:
                await asyncio.sleep(self._config.wait_s)
            batch = [p for p in self._take_batch() if not p.future.cancelled()]  # client gone: skip
            if not batch:
                continue
            images = sum(p.request.count for p in batch)
            started = time.monotonic()
            self._metrics.sampling(images)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run, [p.request for p in batch], batch[0].key
                )
            except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the worker lives on
                logger.exception("a batch of %d requests failed", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(e)
                continue
            finally:
                self._metrics.sampling(0)
            seconds = time.monotonic() - started
            self._seconds_per_image_step = seconds / (images * batch[0].key.steps)
            self._metrics.batch_ran(images, seconds)
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
