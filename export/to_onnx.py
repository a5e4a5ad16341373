"""PyTorch modules to ONNX files, FP32 and FP16.

Exporter: torch's TorchScript exporter (``dynamo=False``), opset 17. On torch 2.13 the
dynamo exporter fails on the glyffuser U-Net once the text length is dynamic (a shape
mismatch inside attention), while the TorchScript exporter gives clean graphs for both
models, and opset 17 (LayerNormalization; GroupNorm as InstanceNormalization) parses in
ONNX Runtime and TensorRT 10/11/RTX alike.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from glyph_engine.export.specs import ComponentSpec

DEFAULT_OPSET = 17

# T5 in FP16 overflows: the feed-forward output projection `wo` produces values past
# 65504 and the residual stream that adds it up grows with depth. These nodes stay FP32
# (Hugging Face keeps `wo` in FP32 for the same reason; RMS norms need FP32 sums too).
T5_FP32_NODES = re.compile(r"(/layer_norm/|/final_layer_norm/|/DenseReluDense/wo/|/layer\.\d+/Add(_\d+)?$)")


class UNetForExport(torch.nn.Module):
    """The diffusers U-Net with positional, ONNX-friendly inputs and one tensor out."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=False,
        )[0]


class TextEncoderForExport(torch.nn.Module):
    """T5 encoder whose padded positions come out zeroed, as the glyffuser feeds the U-Net."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


# Small (fast to trace for the full-size U-Net), but > 1 so that no dynamic axis is
# specialised away as a broadcast dimension. Validation runs at other sizes.
TRACE_SIZES = {"batch": 2, "text_length": 8}


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Traces `module` into `path` with the spec's names and dynamic axes."""
    inputs = spec.sample_inputs(TRACE_SIZES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on Python control flow over shapes
        torch.onnx.export(
            module.eval(),
            tuple(inputs[t.name] for t in spec.inputs),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )


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
