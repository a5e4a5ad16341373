"""OpenVINO backend for CPUs: the U-Net and T5 encoder traced to ONNX and compiled for this
CPU on first use, kept in the artifact cache as compiled blobs (a warm start imports them).

Precisions of the U-Net (T5 always runs FP32; it runs once per call and is cheap):
- fp32: OpenVINO's FP32 kernels (the hint is explicit: on BF16 CPUs OpenVINO would
  otherwise default to BF16);
- bf16: the BF16 inference-precision hint, native on AVX-512 BF16 and AMX CPUs (emulated,
  and slower than FP32, elsewhere);
- int8: NNCF post-training quantization calibrated on real sampling trajectories, used only
  when it passes the quality gate (`glyph_engine.quality`).

Measured against the other candidates in docs/bench-cpu.md.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import openvino as ov
import torch
from torch import Tensor
from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.cache import Artifact, ArtifactCache, ArtifactKey
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser
from glyph_engine.quality import (
    CALIBRATION_PROMPTS,
    GATE_PROMPTS,
    MAX_UNET_RELATIVE_ERROR,
    UNetCall,
    relative_errors,
    torch_unet,
    trajectory_calls,
)
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_spec, unet_spec
from glyph_engine.to_onnx import TextEncoderForExport, UNetForExport, export_onnx

logger = logging.getLogger(__name__)

KIND = "openvino"
BUILD_FORMAT = 1  # bump when what a build does changes: older entries are then not used
UNET, TEXT_ENCODER = "unet.blob", "text_encoder.blob"
_HINTS = {Precision.fp32: "f32", Precision.bf16: "bf16", Precision.int8: "f32"}  # int8: f32 around quantized ops


def artifact_key(model: Glyffuser, precision: Precision) -> ArtifactKey:
    libraries = ["torch", "openvino"] + (["nncf"] if precision is Precision.int8 else [])
    return ArtifactKey(
        model_sha256=model.sha256,
        kind=KIND,
        precision=precision.value,
        versions=(("glyph-engine", __version__), ("build", str(BUILD_FORMAT)), *[(n, _version(n)) for n in libraries]),
        cpu_flags=cpu_info().flags,
    )


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


class OpenVINOBackend:
    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, unet: ov.CompiledModel, text_encoder: ov.CompiledModel, precision: Precision):
        self.precision = precision.value
        self._unet = unet.create_infer_request()
        self._text_encoder = text_encoder.create_infer_request()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = {"input_ids": _numpy(input_ids, np.int64), "attention_mask": _numpy(attention_mask, np.int64)}
        return torch.from_numpy(self._text_encoder.infer(feed)[0])

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor) -> Tensor:
        feed = {
            "sample": _numpy(x, np.float32),
            "timestep": np.full((x.shape[0],), float(timestep), np.float32),
            "encoder_hidden_states": _numpy(text, np.float32),
            "encoder_attention_mask": _numpy(mask, np.int64),
        }
        # infer() copies its outputs: the sampler keeps earlier predictions (second order).
        return torch.from_numpy(self._unet.infer(feed)[0])


def _numpy(tensor: Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype, copy=False)


def open_openvino(
    model: Glyffuser, cache: ArtifactCache, precision: Precision, progress: bool = False
) -> tuple[OpenVINOBackend, list[Artifact]]:
    """The backend at `precision` (not auto), from the cache or built into it; also the
    artifacts used, so callers can tell a cold start ("built") from a warm one ("cache")."""
    core = ov.Core()
    fp32 = cache.get(artifact_key(model, Precision.fp32), lambda: _build(core, model, Precision.fp32, progress))
    used = [fp32]
    if precision is Precision.fp32:
        unet = fp32
    elif precision is Precision.bf16:
        unet = cache.get(artifact_key(model, Precision.bf16), lambda: _build(core, model, Precision.bf16, progress))
        used.append(unet)
    else:
        # The FP32 reference samples the calibration trajectories: imported only for a build.
        unet = cache.get(
            artifact_key(model, Precision.int8),
            lambda: _build_int8(core, model, _import(core, fp32, fp32, Precision.fp32), progress),
        )
        used.append(unet)
        gate = unet.meta["gate"]
        if not gate["passed"]:
            raise GlyphEngineError(
                f"int8 fails the quality gate for this model on this CPU: the U-Net's relative error against "
                f"FP32 reaches {gate['max_relative_error']:.1%} on sampling trajectories (limit "
                f"{gate['limit']:.0%}); use --precision fp32, or auto."
            )
    return _import(core, unet, fp32, precision), used


def int8_gate(model: Glyffuser, cache: ArtifactCache) -> dict | None:
    """The recorded gate result of an int8 build of `model` on this CPU, if one exists."""
    meta = cache.peek(artifact_key(model, Precision.int8))
    return meta.get("gate") if meta else None


def _import(core: ov.Core, unet: Artifact, text_encoder: Artifact, precision: Precision) -> OpenVINOBackend:
    """The backend of compiled blobs (the text encoder's entry is always the FP32 one)."""
    unet_model = _import_blob(core, unet.files[UNET], precision)
    return OpenVINOBackend(unet_model, _import_blob(core, text_encoder.files[TEXT_ENCODER], Precision.fp32), precision)


def _import_blob(core: ov.Core, blob: bytes, precision: Precision) -> ov.CompiledModel:
    # An imported blob does not keep the precision hint it was compiled with: without the
    # config, a BF16 blob runs in FP32 on CPUs whose default is FP32. Checked, not assumed.
    compiled = core.import_model(blob, "CPU", _config(precision))
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != str(getattr(ov.Type, _HINTS[precision])):
        raise GlyphEngineError(f"OpenVINO runs this {precision.value} model in {got}; rebuild the cache entry.")
    return compiled


def _config(precision: Precision) -> dict[str, str]:
    # LATENCY: one stream over all cores; the sampler issues one U-Net call at a time.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _HINTS[precision]}
    # Ray gives each worker its share of cores as OMP_NUM_THREADS (torch follows it too);
    # without it, every worker on a machine would spread over all of its cores.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def onnx_bytes(model: Glyffuser, component: str) -> bytes:
    """The component traced to ONNX in memory, with the export's names and dynamic axes."""
    if component == "unet":
        module, spec = UNetForExport(model.unet), unet_spec(model, 1, 1, model.max_text_length)
    else:
        module, spec = TextEncoderForExport(model.text_encoder), text_encoder_spec(model, 1, model.max_text_length)
    buffer = io.BytesIO()
    export_onnx(module, spec, buffer)
    return buffer.getvalue()


def _blob(compiled: ov.CompiledModel) -> bytes:
    return compiled.export_model().getvalue()


def _stages(precision: Precision, total: int, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=f"first run: building the OpenVINO {precision.value} model for this CPU",
        unit="stage",
        file=sys.stderr,
        disable=not progress,
    )


def _build(core: ov.Core, model: Glyffuser, precision: Precision, progress: bool) -> Artifact:
    # The text encoder is built once, in the FP32 entry; other precisions hold only a U-Net.
    components = (("unet", UNET), ("text_encoder", TEXT_ENCODER)) if precision is Precision.fp32 else (("unet", UNET),)
    with _stages(precision, len(components), progress) as bar:
        files = {}
        for component, name in components:
            bar.set_postfix_str(component)
            hint = precision if component == "unet" else Precision.fp32
            files[name] = _blob(core.compile_model(core.read_model(onnx_bytes(model, component)), "CPU", _config(hint)))
            bar.update()
    return Artifact(files=files, meta={"precision": precision.value})


def _build_int8(core: ov.Core, model: Glyffuser, reference: OpenVINOBackend, progress: bool) -> Artifact:
    """Quantizes the U-Net with NNCF, calibrated on trajectories the FP32 model samples, then
    measures the gate on other prompts and seeds. The verdict is kept with the entry, so a
    failing model is refused at once on later runs."""
    try:
        import nncf
    except ImportError:
        raise GlyphEngineError("--precision int8 needs NNCF: pip install 'glyph-engine[int8]'.") from None
    nncf.set_log_level(logging.ERROR)
    with _stages(Precision.int8, 4, progress) as bar:
        bar.set_postfix_str("calibration trajectories")
        calibration = trajectory_calls(model, reference, CALIBRATION_PROMPTS, 2, seed=1)
        bar.update()
        bar.set_postfix_str("quantizing")
        quantized = nncf.quantize(
            core.read_model(onnx_bytes(model, "unet")),
            nncf.Dataset([call.as_numpy() for call in calibration]),
            subset_size=len(calibration),
            model_type=nncf.ModelType.TRANSFORMER,  # SmoothQuant for the attention matmuls: the most accurate here
        )
        compiled = core.compile_model(quantized, "CPU", _config(Precision.int8))
        bar.update()
        bar.set_postfix_str("quality gate")
        gate_calls = trajectory_calls(model, reference, GATE_PROMPTS, 1, seed=2)
        request = compiled.create_infer_request()

        def int8(call: UNetCall) -> Tensor:
            return torch.from_numpy(request.infer(call.as_numpy())[0])

        worst = max(relative_errors(int8, torch_unet(model), gate_calls))
        bar.update()
        bar.set_postfix_str("saving")
        blob = _blob(compiled)
        bar.update()
    gate = {
        "max_relative_error": worst,
        "limit": MAX_UNET_RELATIVE_ERROR,
        "passed": worst <= MAX_UNET_RELATIVE_ERROR,
        "calls": len(gate_calls),
        "prompts": list(GATE_PROMPTS),
    }
    logger.info("int8 quality gate: worst relative error %.4f (limit %.2f)", worst, MAX_UNET_RELATIVE_ERROR)
    return Artifact(files={UNET: blob}, meta={"precision": "int8", "gate": gate})
