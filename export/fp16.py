"""FP16 copies of FP32 ONNX files, for GPU runtimes (ONNX Runtime CUDA, TensorRT)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

# T5 in FP16 overflows: the feed-forward output projection `wo` produces values past
# 65504 and the residual stream that adds it up grows with depth. These nodes stay FP32
# (Hugging Face keeps `wo` in FP32 for the same reason; RMS norms need FP32 sums too).
T5_FP32_NODES = re.compile(r"(/layer_norm/|/final_layer_norm/|/DenseReluDense/wo/|/layer\.\d+/Add(_\d+)?$)")


def convert_to_fp16(source: Path, target: Path, keep_fp32: re.Pattern[str] | None = None) -> list[str]:
    """Writes an FP16 copy of an FP32 ONNX file; inputs and outputs stay FP32.

    Nodes whose names match `keep_fp32` stay FP32 (casts are inserted around them).
    Returns the names of those nodes.
    """
    model = onnx.load(str(source))
    blocked = [n.name for n in model.graph.node if keep_fp32 is not None and keep_fp32.search(n.name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clamped to FP16 range" for -inf mask constants
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    # The converter appends the casts it inserts around blocked nodes at the end of the node
    # list; ONNX requires topological order.
    graph = OnnxModel(half)
    graph.topological_sort()
    onnx.save(graph.model, str(target))
    return blocked
