"""Inference backends; each implements `glyph_engine.backend.Backend`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from glyph_engine.backends.base import Backend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import open_export
from glyph_engine.model import Glyffuser
from glyph_engine.settings import BackendName

logger = logging.getLogger(__name__)


def create_backend(
    name: BackendName | str, model: Glyffuser, export_dir: Path | None = None, use_cuda_graph: bool = False
) -> Backend:
    """The named backend for `model`; "auto" picks the fastest one available here.

    `export_dir` holds the export (`glyph-engine export`): the ONNX files ONNX Runtime runs
    and the TensorRT engines.
    """
    try:
        name = BackendName(name)
    except ValueError:
        choices = ", ".join(b.value for b in BackendName)
        raise GlyphEngineError(f"unknown backend {name!r}; choose one of {choices}.") from None
    if name is BackendName.auto:
        name = _fastest(model, export_dir)
        logger.info("backend auto: %s", name)
    if name == "torch":
        from glyph_engine.backends.pytorch import TorchBackend

        return TorchBackend(model)
    if name == "onnxruntime":
        try:
            from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
        except ImportError:
            raise GlyphEngineError(
                "the onnxruntime backend needs ONNX Runtime: pip install 'glyph-engine[onnx]' "
                "(or [onnx-gpu] on a CUDA machine)."
            ) from None
        if export_dir is None:
            raise GlyphEngineError("the onnxruntime backend needs an export folder (--export-dir).")
        return OnnxRuntimeBackend(model, export_dir)
    if name == "tensorrt":
        from glyph_engine.backends.tensorrt import TensorRTBackend, require_gpu

        require_gpu()
        if export_dir is None:
            raise GlyphEngineError("the tensorrt backend needs an export folder (--export-dir).")
        return TensorRTBackend(model, export_dir, use_cuda_graph)
    raise AssertionError(f"unhandled backend {name}")


def _fastest(model: Glyffuser, export_dir: Path | None) -> str:
    """TensorRT on a GPU when engines for it exist; on a CPU, ONNX Runtime when the export's
    own measurement says it beats PyTorch; PyTorch otherwise."""
    if export_dir is None or not export_dir.is_dir():
        return "torch"
    if torch.cuda.is_available():
        return "tensorrt" if _has_engines_for_this_gpu(model, export_dir) else "torch"
    try:
        import onnxruntime  # noqa: F401

        manifest = open_export(export_dir, model.sha256, model.source)
    except (ImportError, GlyphEngineError) as e:
        logger.info("backend auto: not using the ONNX export (%s)", e)
        return "torch"
    return manifest.get("cpu_benchmark", {}).get("preferred", "torch")


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
