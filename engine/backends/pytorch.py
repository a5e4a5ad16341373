"""Eager PyTorch backend: the reference every other backend is checked against."""

from __future__ import annotations

import torch
from torch import Tensor

from glyph_engine.model import Glyffuser


class TorchBackend:
    """Runs the diffusers U-Net and transformers T5 as loaded; FP16 U-Net on CUDA."""

    name = "torch"

    def __init__(self, model: Glyffuser, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # FP16 halves memory traffic on a GPU; CPUs here have no fast half math. T5 stays
        # FP32 everywhere: its feed-forward output overflows in FP16.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.unet = model.unet.to(self.device, self.dtype)
        self.text_encoder = model.text_encoder.to(self.device)

    @torch.inference_mode()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)

    @torch.inference_mode()
    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor) -> Tensor:
        return self.unet(
            x.to(self.dtype),
            timestep,
            encoder_hidden_states=text.to(self.dtype),
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
