"""OpenVINO backend for CPUs: runs a U-Net and T5 encoder compiled for this CPU, imported from
the blobs `glyph_engine.openvino_build` builds on first use and keeps in the artifact cache.

Precisions of the U-Net (T5 always runs FP32; it runs once per call and is cheap):
- fp32: OpenVINO's FP32 kernels (the hint is explicit: on BF16 CPUs OpenVINO would
  otherwise default to BF16);
- bf16: the BF16 inference-precision hint, native on AVX-512 BF16 and AMX CPUs (emulated,
  and slower than FP32, elsewhere);
- int8: a U-Net quantized by NNCF, FP32 around its quantized ops.

The U-Net runs at static input sizes: a model compiled for one batch and text length runs
1.2-1.5x faster than the same model compiled for any (docs/bench-cpu.md), so the backend asks
for one per size it meets (`unet_for`, built and cached by `glyph_engine.openvino_build`). A
round of a call's rows runs as `split` requests of equal size, `streams` of them at once,
each on its own cores.

Measured against the other candidates in docs/bench-cpu.md.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import openvino as ov
import torch
from torch import Tensor

from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_feed, unet_feed

_HINTS = {Precision.fp32: "f32", Precision.bf16: "bf16", Precision.int8: "f32"}  # int8: f32 around quantized ops


# The most rows the U-Net runs at once: 64 of the embedded glyffuser's 32x32 images, counted
# in pixels. Compiled for its size, a 64-row call takes half of a 128-row one in bf16 and 0.96x
# of it in fp32 (docs/bench-cpu.md), so a guided step of 64 images (128 rows) runs as two
# rounds at the size of the unguided steps: one U-Net to compile and import, not two.
CALL_PIXELS = 64 * 32 * 32

# In bf16 a round's rows run as this many requests of equal rows, at once where there are as
# many cores, each on its own (OpenVINO streams). On 2 cores, 64 rows as two 32-row requests on
# one core each take 0.91x of one 64-row request over both, and fewer rows gain more
# (docs/bench-cpu.md): the element-wise work between the matrix products scales better across
# requests than across the threads of one. In fp32 it was neutral (0.98x at 128 rows, 1.04x at
# 64), so fp32 runs one request per round. More than 2 is untried. The split does not depend on
# the cores: with one (a Ray worker's share) the two requests run one after the other, at the
# same sizes, so a seed draws the same glyph in a one-core worker as in `generate`.
BF16_SPLIT = 2
# Sets the split for every precision, to tune or compare (bench/cpu_candidates.py).
SPLIT_ENV_VAR = "GLYPH_ENGINE_UNET_REQUESTS"
MAX_SPLIT = 16

# The compiled U-Nets a backend holds at once, one per (rows, text length) in use: a run meets
# one or two, a bulk worker or serve replica one per batch size and prompt length; each held
# model costs its weights' memory.
HELD_SIZES = 8

# (rows, text length), streams -> the U-Net to run at those input sizes (compiled for exactly
# them, or for any size), in that many streams.
UNetForSize = Callable[[tuple[int, int], int], ov.CompiledModel]


class OpenVINOBackend:
    name = "openvino"
    device = torch.device("cpu")

    def __init__(
        self,
        unet_for: UNetForSize,
        text_encoder: ov.CompiledModel,
        precision: Precision,
        split: int = 1,
        streams: int = 1,
    ) -> None:
        self.precision = precision.value
        self._unet_for = unet_for
        self._split = split  # requests per round
        self._streams = streams  # the U-Net models' streams: requests that run at once
        # Each (size, streams)'s requests, one per stream; least recently used first.
        self._unets: OrderedDict[tuple[tuple[int, int], int], list[ov.InferRequest]] = OrderedDict()
        self._text_encoder = text_encoder.create_infer_request()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = text_encoder_feed(input_ids, attention_mask, self.device)
        return torch.from_numpy(self._text_encoder.infer({k: v.numpy() for k, v in feed.items()})[0])

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        most = max(1, CALL_PIXELS // (x.shape[-2] * x.shape[-1]))
        feed = {k: v.numpy() for k, v in unet_feed(x, timestep, text, mask, self.device, guidance).items()}
        out = [
            self._round({k: v[start : start + most] for k, v in feed.items()}, text.shape[1])
            for start in range(0, x.shape[0], most)
        ]
        return torch.from_numpy(out[0] if len(out) == 1 else np.concatenate(out))

    def _round(self, feed: dict[str, np.ndarray], length: int) -> np.ndarray:
        """The U-Net on these rows, split into `split` requests of equal rows, `streams` at a
        time; the last is filled up with copies of the last row, whose outputs are dropped. A
        round of fewer rows than that (one) runs as one request over all cores: in a stream of
        its own it would have one core (serving one-glyph requests: 15.5 against 13.2 glyphs/s)."""
        rows = len(feed["sample"])
        split = self._split if rows >= self._split else 1
        each = -(-rows // split)
        parts = -(-rows // each)
        requests = self._unet((each, length), min(self._streams, split))
        out = []
        for first in range(0, parts, len(requests)):
            running = requests[: parts - first]
            for i, request in enumerate(running):
                start = (first + i) * each
                request.start_async({k: _fill(v[start : start + each], each) for k, v in feed.items()})
            for request in running:
                request.wait()
                # Copied: the request's buffer is reused, and the sampler keeps earlier predictions.
                out.append(request.get_output_tensor(0).data.copy())
        return (out[0] if parts == 1 else np.concatenate(out))[:rows]

    def _unet(self, size: tuple[int, int], streams: int) -> list[ov.InferRequest]:
        key = (size, streams)
        if key not in self._unets:
            compiled = self._unet_for(size, streams)
            self._unets[key] = [compiled.create_infer_request() for _ in range(streams)]
            if len(self._unets) > HELD_SIZES:
                self._unets.popitem(last=False)
        self._unets.move_to_end(key)
        return self._unets[key]


def _fill(values: np.ndarray, rows: int) -> np.ndarray:
    """`values` with its last row repeated up to `rows` rows."""
    missing = rows - values.shape[0]
    return values if missing == 0 else np.concatenate([values, np.repeat(values[-1:], missing, axis=0)])


def unet_split(precision: Precision) -> int:
    """How many requests of equal rows a round of U-Net rows runs as, at `precision`:
    $GLYPH_ENGINE_UNET_REQUESTS when set, else `BF16_SPLIT` in bf16 and one otherwise."""
    value = os.environ.get(SPLIT_ENV_VAR, "").strip()
    if not value:
        return BF16_SPLIT if precision is Precision.bf16 else 1
    if not value.isdigit() or not 1 <= int(value) <= MAX_SPLIT:
        raise GlyphEngineError(
            f"${SPLIT_ENV_VAR} is {value!r}; it must be a whole number from 1 to {MAX_SPLIT} (the requests a "
            "round of U-Net rows runs as), or unset for the default."
        )
    return int(value)


def unet_streams(precision: Precision) -> int:
    """How many of a round's requests run at once here: one per core this process may use
    (its share under Ray, `OMP_NUM_THREADS`), up to the round's requests."""
    return max(1, min(unet_split(precision), _share_of_cores() or cpu_info().cores))


def _share_of_cores() -> int | None:
    """The cores Ray gave this worker ($OMP_NUM_THREADS; torch follows it too); None outside Ray."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else None


def import_blob(core: ov.Core, blob: bytes, precision: Precision, streams: int = 1) -> ov.CompiledModel:
    """A compiled model from its blob (`CompiledModel.export_model`), run at `precision` in
    `streams` streams."""
    # An imported blob does not keep the precision hint it was compiled with: without the
    # config, a BF16 blob runs in FP32 on CPUs whose default is FP32. Checked, not assumed.
    compiled = core.import_model(blob, "CPU", compile_config(precision, streams))
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != str(getattr(ov.Type, _HINTS[precision])):
        raise GlyphEngineError(f"OpenVINO runs this {precision.value} model in {got}; rebuild the cache entry.")
    return compiled


def compile_config(precision: Precision, streams: int = 1) -> dict[str, str]:
    """OpenVINO's CPU configuration for a model at `precision` in `streams` streams, when
    compiled and when imported."""
    # LATENCY: one stream over all cores, for a model run one request at a time (T5).
    hint = {"PERFORMANCE_HINT": "LATENCY"}
    if streams > 1:
        hint = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
    config = {**hint, "INFERENCE_PRECISION_HINT": _HINTS[precision]}
    # Without a worker's share, every Ray worker on a machine would spread over all of its cores.
    threads = _share_of_cores()
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config
