"""The backend `--backend` names, opened for a model; "auto" picks the fastest one here.

Outside `glyph_engine.backends` because opening the OpenVINO backend may build its model
first (`glyph_engine.openvino_build`), and building samples through the pipeline: backends
only load and run.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from glyph_engine.backends.base import Backend
from glyph_engine.cache import ArtifactCache, default_cache_dir
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import open_export
from glyph_engine.model import Glyffuser
from glyph_engine.precision import choose
from glyph_engine.settings import BackendName, Precision

logger = logging.getLogger(__name__)


def create_backend(
    name: BackendName | str,
    model: Glyffuser,
    export_dir: Path | None = None,
    use_cuda_graph: bool | None = None,
    precision: Precision | str = Precision.auto,
    cache: ArtifactCache | None = None,
    progress: bool = False,
) -> Backend:
    """The named backend for `model`; "auto" picks the fastest one available here.

    `export_dir` holds the export (`glyph-engine export`): the ONNX files ONNX Runtime runs
    and the TensorRT engines. On a CPU, auto needs no export: the OpenVINO backend compiles
    the model for this CPU on first use into `cache` (None: the default cache folder).
    `precision` is the U-Net's (`glyph_engine.precision`: what each backend runs, and what
    auto takes on each device); a backend refuses one it does not run. `use_cuda_graph`: replay
    each batch shape from a CUDA graph on a GPU; None: the backend's default (torch: on,
    TensorRT: off). `progress` shows a bar while building.
    """
    try:
        name = BackendName(name)
    except ValueError:
        choices = ", ".join(b.value for b in BackendName)
        raise GlyphEngineError(f"unknown backend {name!r}; choose one of {choices}.") from None
    try:
        precision = Precision(precision)
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise GlyphEngineError(f"unknown precision {precision!r}; choose one of {choices}.") from None
    if name is BackendName.auto:
        name = BackendName(_fastest(model, export_dir))
        logger.info("backend auto: %s", name.value)
    if name is BackendName.openvino:
        return _openvino(model, precision, cache or ArtifactCache(default_cache_dir()), progress)
    if name is BackendName.inductor:
        return _inductor(model, precision, cache or ArtifactCache(default_cache_dir()), progress)
    if name is BackendName.torch:
        from glyph_engine.backends.pytorch import TorchBackend

        return TorchBackend(model, precision=precision, cuda_graphs=use_cuda_graph is not False)
    if name is BackendName.onnxruntime:
        try:
            from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
        except ImportError:
            raise GlyphEngineError(
                "the onnxruntime backend needs ONNX Runtime: pip install 'glyph-engine[onnx]' "
                "(or [onnx-gpu] on a CUDA machine)."
            ) from None
        if export_dir is None:
            raise GlyphEngineError("the onnxruntime backend needs an export folder (--export-dir).")
        return OnnxRuntimeBackend(model, export_dir, precision)
    if name is BackendName.tensorrt:
        from glyph_engine.backends.tensorrt import TensorRTBackend

        if export_dir is None:
            raise GlyphEngineError("the tensorrt backend needs an export folder (--export-dir).")
        return TensorRTBackend(model, export_dir, bool(use_cuda_graph), precision)
    raise AssertionError(f"unhandled backend {name}")


def _openvino(model: Glyffuser, requested: Precision, cache: ArtifactCache, progress: bool) -> Backend:
    try:
        from glyph_engine.openvino_build import int8_gate, open_openvino
    except ImportError:
        raise GlyphEngineError("the openvino backend needs OpenVINO: pip install openvino.") from None
    # The gate is read only for auto: a model with an int8 build that passed it here runs int8.
    gate = int8_gate(model, cache) if requested is Precision.auto else None
    precision = choose("openvino", "cpu", requested, int8_passed=gate is not None and gate["passed"])
    cpu = cpu_info()
    if precision is Precision.bf16 and not (cpu.has_bf16 or "avx512f" in cpu.flags):
        # OpenVINO's bf16 kernels need AVX-512 (native with BF16 units, emulated without); below
        # it the plugin either runs f32 under the bf16 name or fails at the first node it lacks.
        raise GlyphEngineError(
            "OpenVINO runs bf16 only on CPUs with AVX-512, and this one has none: use --precision fp32 "
            "(what auto picks here)."
        )
    _warn_if_emulated(precision)
    backend, artifacts = open_openvino(model, cache, precision, progress)
    logger.info("openvino %s: %s", precision.value, ", ".join(a.source for a in artifacts))
    return backend


def _inductor(model: Glyffuser, requested: Precision, cache: ArtifactCache, progress: bool) -> Backend:
    from glyph_engine.inductor_build import open_inductor

    precision = choose("inductor", "cpu", requested)
    _warn_if_emulated(precision)
    backend, artifacts = open_inductor(model, cache, precision, progress)
    logger.info("inductor %s: %s", precision.value, ", ".join(a.source for a in artifacts))
    return backend


def _warn_if_emulated(precision: Precision) -> None:
    if precision is Precision.bf16 and not cpu_info().has_bf16:
        logger.warning("this CPU has no BF16 units (AVX-512 BF16 or AMX): bf16 runs emulated, slower than fp32")


def _fastest(model: Glyffuser, export_dir: Path | None) -> str:
    """TensorRT on a GPU when engines for it exist, else PyTorch. On a CPU, OpenVINO (built on
    first use, no export needed) where it is installed; else ONNX Runtime when the export's
    own measurement says it beats PyTorch; PyTorch otherwise."""
    if torch.cuda.is_available():
        if export_dir is None or not export_dir.is_dir():
            return "torch"
        return "tensorrt" if _has_engines_for_this_gpu(model, export_dir) else "torch"
    if openvino_installed():
        return "openvino"
    if export_dir is None or not export_dir.is_dir():
        return "torch"
    try:
        import onnxruntime  # noqa: F401

        manifest = open_export(export_dir, model.sha256, model.source)
    except (ImportError, GlyphEngineError) as e:
        logger.info("backend auto: not using the ONNX export (%s)", e)
        return "torch"
    return manifest.get("cpu_benchmark", {}).get("preferred", "torch")


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _has_engines_for_this_gpu(model: Glyffuser, export_dir: Path) -> bool:
    from glyph_engine.backends.tensorrt import load_tensorrt, select_build

    trt = load_tensorrt()
    if trt is None:
        return False
    major, minor = torch.cuda.get_device_capability()
    try:
        select_build(open_export(export_dir, model.sha256, model.source), trt, f"sm{major}{minor}", model.source)
    except GlyphEngineError as e:
        logger.info("backend auto: not using TensorRT (%s)", e)
        return False
    return True
