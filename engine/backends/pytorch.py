"""Eager PyTorch backend: the reference every other backend is checked against."""

from __future__ import annotations

import torch
from torch import Tensor

from glyph_engine.cuda_graphs import Capturer, CudaCapturer, GraphedUNet, guarded
from glyph_engine.model import Glyffuser, guidance_labels, placed
from glyph_engine.precision import choose
from glyph_engine.settings import Precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class TorchBackend:
    """Runs the diffusers U-Net and transformers T5 as loaded: an FP32 U-Net, or FP16 on CUDA.

    On CUDA the U-Net runs channels_last (cuDNN's fast layout for half-precision convolutions)
    with diffusers' SDPA attention, replayed from CUDA graphs (`glyph_engine.cuda_graphs`).
    `capturer` replaces the graph capture (tests exercise the graph logic on a CPU with it);
    `cuda_graphs=False` runs every call eagerly (the benchmark's "eager" system).
    """

    name = "torch"

    def __init__(
        self,
        model: Glyffuser,
        device: str | torch.device | None = None,
        precision: Precision | str = Precision.auto,
        capturer: Capturer | None = None,
        cuda_graphs: bool = True,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # The U-Net's precision only: T5 stays FP32 everywhere (its feed-forward output
        # overflows in FP16).
        self.precision = choose(self.name, self.device.type, precision).value
        self.dtype = DTYPES[self.precision]
        unet = placed(model.unet, self.device, self.dtype)
        if self.device.type == "cuda" and unet is not model.unet:  # a copy: its layout is ours to change
            unet = unet.to(memory_format=torch.channels_last)
        self.unet = unet
        self.text_encoder = placed(model.text_encoder, self.device, torch.float32)
        if capturer is None and self.device.type == "cuda" and cuda_graphs:
            capturer = CudaCapturer(self.device)
        # A student's guidance input is not among a graph's buffers: it runs eagerly.
        self.embeds_guidance = model.guidance_embedding
        graphed = capturer is not None and not self.embeds_guidance
        self.graphs = GraphedUNet(self._unet, capturer) if graphed else None

    @torch.inference_mode()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)

    def _unet(self, x: Tensor, timesteps: Tensor, text: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.unet(
            x,
            timesteps,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            class_labels=labels,
            return_dict=False,
        )[0]

    @torch.inference_mode()
    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        x = x.to(self.device, self.dtype)
        # A tensor, not a Python int: a captured graph reads the timestep from its buffer.
        timesteps = torch.full((x.shape[0],), timestep, dtype=torch.long, device=self.device)
        text, mask = text.to(self.device, self.dtype), mask.to(self.device)
        if self.embeds_guidance:
            if guidance is None:
                raise ValueError("this U-Net takes the guidance scale as an input; pass guidance")
            labels = guidance_labels(guidance, x.shape[0], self.device)
            return guarded(lambda: self._unet(x, timesteps, text, mask, labels), x.shape[0])
        run = self.graphs or self._unet
        return guarded(lambda: run(x, timesteps, text, mask), x.shape[0])
