"""OpenVINO models built for this CPU on first use: the U-Net and T5 encoder traced to ONNX,
compiled, and kept in the artifact cache as compiled blobs (a warm start imports them into
`glyph_engine.backends.openvino`).

An int8 U-Net is quantized by NNCF post-training quantization, calibrated on real sampling
trajectories, and used only when it passes the quality gate (`glyph_engine.quality`); the
gate's verdict is kept with the cache entry. Building samples trajectories through the
pipeline, so it lives here rather than in the backend, which only loads and runs.
"""

from __future__ import annotations

import io
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

import openvino as ov
import torch
from torch import Tensor
from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.backends.openvino import OpenVINOBackend, compile_config, load_openvino
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
            lambda: _build_int8(core, model, _load(core, fp32, fp32, Precision.fp32), progress),
        )
        used.append(unet)
        gate = unet.meta["gate"]
        if not gate["passed"]:
            raise GlyphEngineError(
                f"int8 fails the quality gate for this model on this CPU: the U-Net's relative error against "
                f"FP32 reaches {gate['max_relative_error']:.1%} on sampling trajectories (limit "
                f"{gate['limit']:.0%}); use --precision fp32, or auto."
            )
    return _load(core, unet, fp32, precision), used


def int8_gate(model: Glyffuser, cache: ArtifactCache) -> dict | None:
    """The recorded gate result of an int8 build of `model` on this CPU, if one exists."""
    meta = cache.peek(artifact_key(model, Precision.int8))
    return meta.get("gate") if meta else None


def _load(core: ov.Core, unet: Artifact, text_encoder: Artifact, precision: Precision) -> OpenVINOBackend:
    """The backend of cached entries (the text encoder's entry is always the FP32 one)."""
    return load_openvino(core, unet.files[UNET], text_encoder.files[TEXT_ENCODER], precision)


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
            onnx = core.read_model(onnx_bytes(model, component))
            files[name] = _blob(core.compile_model(onnx, "CPU", compile_config(hint)))
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
        compiled = core.compile_model(quantized, "CPU", compile_config(Precision.int8))
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
