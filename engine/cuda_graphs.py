"""The U-Net replayed from CUDA graphs: one capture per input shape, inputs copied into its
static buffers.

A small U-Net at the glyffuser's sizes is launch-bound on a GPU: hundreds of small kernels
per call, each costing more to launch than to run. A captured graph launches them all at
once. Graphs fix their shapes, so batches are padded up to a few bucket sizes (padding rows
are computed and dropped) and each (bucket, text length, dtype) is captured once.

The capture itself sits behind `Capturer`, so everything else here (bucketing, padding,
reuse, fallbacks, error messages) is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError

logger = logging.getLogger(__name__)

# Powers of two up to 2048 images per call (4096 with guidance's doubled batch is beyond the
# largest batch a 80 GB GPU holds for the full-size glyffuser); at most 2x padding waste.
BUCKETS = tuple(2**i for i in range(13))

UNetCall = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x, timesteps, text, mask) -> eps


def bucket(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket that holds `batch` images, or None beyond the largest."""
    return next((b for b in buckets if b >= batch), None)


class Capturer(Protocol):
    def capture(self, run: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """Records `run` (which reads static buffers); returns a function that replays it
        and gives its (static) output."""
        ...


class CudaCapturer:
    """torch.cuda.CUDAGraph capture: warm-up runs on a side stream first (cuDNN and cuBLAS
    pick their kernels and allocate workspaces outside the graph), then one captured run."""

    def __init__(self, device: torch.device, warmup: int = 2):
        self.device, self.warmup = device, warmup
        self.pool = torch.cuda.graph_pool_handle()  # graphs share one memory pool

    def capture(self, run: Callable[[], Tensor]) -> Callable[[], Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = run()

        def replay() -> Tensor:
            graph.replay()
            return output

        return replay


@dataclass(frozen=True)
class _Graph:
    inputs: tuple[Tensor, ...]  # static buffers the graph reads: x, timesteps, text, mask
    replay: Callable[[], Tensor]


class GraphedUNet:
    """Calls `unet` through captured graphs; shapes no graph can take run eagerly."""

    def __init__(self, unet: UNetCall, capturer: Capturer, buckets: tuple[int, ...] = BUCKETS):
        self.unet, self.capturer, self.buckets = unet, capturer, buckets
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_keys: set[tuple] = set()  # shapes whose capture failed: run eagerly from now on

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def __call__(self, x: Tensor, timesteps: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        batch = x.shape[0]
        size = bucket(batch, self.buckets)
        key = (size, text.shape[1], x.dtype, x.device)
        if size is None or key in self.eager_keys:
            return self.unet(x, timesteps, text, mask)
        graph = self.graphs.get(key) or self._capture(key, x, timesteps, text, mask)
        if graph is None:
            return self.unet(x, timesteps, text, mask)
        for buffer, value in zip(graph.inputs, (x, timesteps, text, mask), strict=True):
            buffer[:batch].copy_(value)
        # The output buffer is the graph's own and is overwritten by the next replay; the
        # sampler keeps earlier predictions, so callers get a copy.
        return graph.replay()[:batch].clone()

    def _capture(self, key: tuple, x: Tensor, timesteps: Tensor, text: Tensor, mask: Tensor) -> _Graph | None:
        size = key[0]
        # Padding rows: zero images and text with every token attended to (an all-masked
        # row would make attention's softmax NaN; harmless as it is dropped, but wasteful to
        # debug).
        inputs = (_padded(x, size, 0), _padded(timesteps, size, 0), _padded(text, size, 0), _padded(mask, size, 1))
        try:
            replay = self.capturer.capture(lambda: self.unet(*inputs))
        except torch.OutOfMemoryError:
            self.eager_keys.add(key)
            logger.warning("CUDA graphs: out of memory capturing U-Net batch %d; running it without a graph", size)
            if x.device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed capture allocated
            return None
        self.graphs[key] = _Graph(inputs, replay)
        return self.graphs[key]


def _padded(tensor: Tensor, size: int, fill: float) -> Tensor:
    out = torch.full((size, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    out[: tensor.shape[0]].copy_(tensor)
    return out


def guarded(call: Callable[[], Tensor], batch: int) -> Tensor:
    """Runs a U-Net call, turning GPU failures into one-line errors: out of memory says what
    to change; any other CUDA error stops the run (the GPU's state is then unknown, and an
    image computed after it could be silently wrong)."""
    try:
        return call()
    except torch.OutOfMemoryError:
        raise GlyphEngineError(
            f"the GPU ran out of memory in a U-Net call of batch {batch}; pass a smaller --batch-size."
        ) from None
    except RuntimeError as e:
        if "CUDA" not in str(e) and "cuda" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        raise GlyphEngineError(f"CUDA error in the U-Net ({first}); the run stopped and wrote nothing.") from None
