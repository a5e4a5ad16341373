"""Inference backends; each implements `glyph_engine.backend.Backend`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from glyph_engine.artifacts import open_export
from glyph_engine.backend import Backend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")


def create_backend(name: str, model: Glyffuser, export_dir: Path | None = None) -> Backend:
    """The named backend for `model`; "auto" picks the fastest one available here.

    `export_dir` holds the ONNX export (`glyph-engine export`) that ONNX Runtime runs.
    """
    if name == "auto":
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
    raise GlyphEngineError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")


def _fastest(model: Glyffuser, export_dir: Path | None) -> str:
    """ONNX Runtime on a CPU when the export's own measurement says it beats PyTorch."""
    if torch.cuda.is_available() or export_dir is None or not export_dir.is_dir():
        return "torch"
    try:
        import onnxruntime  # noqa: F401

        manifest = open_export(export_dir, model.sha256, model.source)
    except (ImportError, GlyphEngineError) as e:
        logger.info("backend auto: not using the ONNX export (%s)", e)
        return "torch"
    return manifest.get("cpu_benchmark", {}).get("preferred", "torch")
