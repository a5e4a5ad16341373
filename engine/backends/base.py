"""The one interface every inference backend (PyTorch, ONNX Runtime, OpenVINO, TensorRT) implements.

The pipeline and the sampler only ever see this: they never know which backend runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Backend(Protocol):
    """Inputs may come on any device and in any dtype: a backend moves and casts them itself.
    Outputs are on `device`. A backend never modifies the model it was built from."""

    name: str
    device: torch.device  # where the backend computes and leaves its outputs
    # The U-Net's compute precision as it runs ("fp32", "fp16", "bf16" or "int8"), never merely
    # the one asked for: PNG metadata and bench results record it (`glyph_engine.precision`).
    precision: str

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """T5 encoder last hidden state, (P, L, D) float32, padded positions zeroed."""
        ...

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        """Noise prediction eps for images x (B, C, H, W) at one timestep.

        `text` is (B, L, D) and `mask` (B, L) with 1 for real tokens; the output has x's
        shape, in the backend's compute dtype. `guidance`: the scale, for a distilled
        student's U-Net that takes it as an input (`Glyffuser.guidance_embedding`, fed as the
        graph's `guidance` input), None otherwise.
        """
        ...
