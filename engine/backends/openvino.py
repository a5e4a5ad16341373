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
for one per size it meets (`unet_for`, built and cached by `glyph_engine.openvino_build`).

Measured against the other candidates in docs/bench-cpu.md.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import openvino as ov
import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_feed, unet_feed

_HINTS = {Precision.fp32: "f32", Precision.bf16: "bf16", Precision.int8: "f32"}  # int8: f32 around quantized ops


# The most rows of a U-Net call: 64 of the embedded glyffuser's 32x32 images, counted in
# pixels. Compiled for its size, a 64-row call takes half of a 128-row one in bf16 and 0.96x
# of it in fp32 (docs/bench-cpu.md), so a guided step of 64 images (128 rows) runs as two
# calls at the size of the unguided steps: one U-Net to compile and import, not two.
CALL_PIXELS = 64 * 32 * 32

# The compiled U-Nets a backend holds at once, one per (rows, text length) in use: a run meets
# one or two, a bulk worker or serve replica one per batch size and prompt length; each held
# model costs its weights' memory.
HELD_SIZES = 8

# (rows, text length) -> the U-Net to run at those input sizes (compiled for exactly them, or
# for any size).
UNetForSize = Callable[[tuple[int, int]], ov.CompiledModel]


class OpenVINOBackend:
    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, unet_for: UNetForSize, text_encoder: ov.CompiledModel, precision: Precision):
        self.precision = precision.value
        self._unet_for = unet_for
        self._unets: OrderedDict[tuple[int, int], ov.InferRequest] = OrderedDict()  # least recently used first
        self._text_encoder = text_encoder.create_infer_request()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = text_encoder_feed(input_ids, attention_mask, self.device)
        return torch.from_numpy(self._text_encoder.infer({k: v.numpy() for k, v in feed.items()})[0])

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        rows = max(1, CALL_PIXELS // (x.shape[-2] * x.shape[-1]))
        chunks = zip(x.split(rows), text.split(rows), mask.split(rows), strict=True)
        out = [self._call(rows_x, timestep, rows_text, rows_mask, guidance) for rows_x, rows_text, rows_mask in chunks]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _call(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None) -> Tensor:
        feed = unet_feed(x, timestep, text, mask, self.device, guidance)
        # infer() copies its outputs: the sampler keeps earlier predictions (second order).
        return torch.from_numpy(
            self._unet((x.shape[0], text.shape[1])).infer({k: v.numpy() for k, v in feed.items()})[0]
        )

    def _unet(self, size: tuple[int, int]) -> ov.InferRequest:
        if size not in self._unets:
            self._unets[size] = self._unet_for(size).create_infer_request()
            if len(self._unets) > HELD_SIZES:
                self._unets.popitem(last=False)
        self._unets.move_to_end(size)
        return self._unets[size]


def import_blob(core: ov.Core, blob: bytes, precision: Precision) -> ov.CompiledModel:
    """A compiled model from its blob (`CompiledModel.export_model`), run at `precision`."""
    # An imported blob does not keep the precision hint it was compiled with: without the
    # config, a BF16 blob runs in FP32 on CPUs whose default is FP32. Checked, not assumed.
    compiled = core.import_model(blob, "CPU", compile_config(precision))
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != str(getattr(ov.Type, _HINTS[precision])):
        raise GlyphEngineError(f"OpenVINO runs this {precision.value} model in {got}; rebuild the cache entry.")
    return compiled


def compile_config(precision: Precision) -> dict[str, str]:
    """OpenVINO's CPU configuration for a model at `precision`, when compiled and when imported."""
    # LATENCY: one stream over all cores; the sampler issues one U-Net call at a time.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _HINTS[precision]}
    # Ray gives each worker its share of cores as OMP_NUM_THREADS (torch follows it too);
    # without it, every worker on a machine would spread over all of its cores.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return config
