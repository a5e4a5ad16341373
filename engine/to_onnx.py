"""PyTorch modules to ONNX graphs: the export's files and the runtime's first-use artifacts.

Exporter: torch's TorchScript exporter (``dynamo=False``), opset 17. On torch 2.13 the
dynamo exporter fails on the glyffuser U-Net once the text length is dynamic (a shape
mismatch inside attention), while the TorchScript exporter gives clean graphs for both
models, and opset 17 (LayerNormalization; GroupNorm as InstanceNormalization) parses in
ONNX Runtime and TensorRT 10/11/RTX alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import torch

from glyph_engine.model import guidance_labels
from glyph_engine.specs import ComponentSpec

DEFAULT_OPSET = 17


class UNetForExport(torch.nn.Module):
    """The diffusers U-Net with positional, ONNX-friendly inputs and one tensor out."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, guidance=None):
        # `guidance`: a distilled student's scale, embedded as its training embedded it.
        labels = None if guidance is None else guidance_labels(guidance, sample.shape[0], sample.device)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            class_labels=labels,
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


def export_onnx(
    module: torch.nn.Module, spec: ComponentSpec, path: Path | BinaryIO, opset: int = DEFAULT_OPSET
) -> None:
    """Traces `module` into `path` (a file, or a binary stream) with the spec's names and dynamic axes."""
    inputs = spec.sample_inputs(TRACE_SIZES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on Python control flow over shapes
        torch.onnx.export(
            module.eval(),
            tuple(inputs[t.name] for t in spec.inputs),
            path if hasattr(path, "write") else str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )
