"""OpenVINO backend for CPUs: runs a U-Net and T5 encoder compiled for this CPU, imported from
the blobs `glyph_engine.openvino_build` builds on first use and keeps in the artifact cache.

Precisions of the U-Net (T5 always runs FP32; it runs once per call and is cheap):
- fp32: OpenVINO's FP32 kernels (the hint is explicit: on BF16 CPUs OpenVINO would
  otherwise default to BF16);
- bf16: the BF16 inference-precision hint, native on AVX-512 BF16 and AMX CPUs (emulated,
  and slower than FP32, elsewhere);
- int8: a U-Net quantized by NNCF, FP32 around its quantized ops.

Measured against the other candidates in docs/bench-cpu.md.
"""

from __future__ import annotations

import os

import openvino as ov
import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_feed, unet_feed

_HINTS = {Precision.fp32: "f32", Precision.bf16: "bf16", Precision.int8: "f32"}  # int8: f32 around quantized ops


class OpenVINOBackend:
    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, unet: ov.CompiledModel, text_encoder: ov.CompiledModel, precision: Precision):
        self.precision = precision.value
        self._unet = unet.create_infer_request()
        self._text_encoder = text_encoder.create_infer_request()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = text_encoder_feed(input_ids, attention_mask, self.device)
        return torch.from_numpy(self._text_encoder.infer({k: v.numpy() for k, v in feed.items()})[0])

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        feed = unet_feed(x, timestep, text, mask, self.device, guidance)
        # infer() copies its outputs: the sampler keeps earlier predictions (second order).
        return torch.from_numpy(self._unet.infer({k: v.numpy() for k, v in feed.items()})[0])


def load_openvino(core: ov.Core, unet: bytes, text_encoder: bytes, precision: Precision) -> OpenVINOBackend:
    """The backend of two compiled blobs: a U-Net at `precision` and the FP32 text encoder."""
    return OpenVINOBackend(_import(core, unet, precision), _import(core, text_encoder, Precision.fp32), precision)


def _import(core: ov.Core, blob: bytes, precision: Precision) -> ov.CompiledModel:
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
