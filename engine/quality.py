"""The U-Net part of the quality gate: inputs taken from real sampling trajectories, and the
relative error of a reduced-precision U-Net against FP32 on them.

Random inputs flatter quantization (real trajectories have the value ranges that matter:
near-clean images at the last steps, real text embeddings), so calibration and the gate both
use what the sampler really feeds the U-Net.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from glyph_engine.backends.base import Backend
from glyph_engine.model import Glyffuser, guidance_labels
from glyph_engine.pipeline import generate
from glyph_engine.settings import GenerationSettings
from glyph_engine.specs import unet_feed

# The gate's limit on the U-Net: ||eps - eps_fp32|| / ||eps_fp32||, worst call of a trajectory.
MAX_UNET_RELATIVE_ERROR = 0.01

# Calibration draws on prompts the evaluation does not use (RADICAL_PROMPTS), so a calibrated
# model is not tuned to the prompts that judge it.
CALIBRATION_PROMPTS = ("tree", "fish", "mountain", "rain", "gold", "eye", "bird", "stone")
GATE_PROMPTS = ("metal", "heart", "speech", "grass")


@dataclass(frozen=True)
class UNetCall:
    sample: Tensor
    timestep: int
    text: Tensor
    mask: Tensor
    guidance: float | None = None  # a distilled student's guidance input

    def as_numpy(self) -> dict[str, np.ndarray]:
        """The feed of an exported U-Net, as NNCF and ONNX Runtime take it."""
        feed = unet_feed(self.sample, self.timestep, self.text, self.mask, guidance=self.guidance)
        return {name: value.numpy() for name, value in feed.items()}


class _Recorder:
    """A backend that records every U-Net call of the one it wraps."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.calls: list[UNetCall] = []

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner.encode_text(input_ids, attention_mask)

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        self.calls.append(UNetCall(x.float().cpu(), timestep, text.float().cpu(), mask.cpu(), guidance))
        student = {} if guidance is None else {"guidance": guidance}
        return self.inner.denoise(x, timestep, text, mask, **student)


def trajectory_calls(
    model: Glyffuser,
    backend: Backend,
    prompts: Sequence[str],
    per_prompt: int,
    seed: int,
    steps: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[UNetCall]:
    """Every U-Net call of a real generation (the model's default steps, guidance and interval)."""
    recorder = _Recorder(backend)
    generate(model, recorder, list(prompts), per_prompt, GenerationSettings(steps=steps, seed=seed), on_step=on_step)
    return recorder.calls


def relative_errors(
    candidate: Callable[[UNetCall], Tensor], reference: Callable[[UNetCall], Tensor], calls: Sequence[UNetCall]
) -> list[float]:
    """||candidate - reference|| / ||reference|| for each call, computed in float64."""
    errors = []
    for call in calls:
        ref = reference(call).double()
        errors.append(float((candidate(call).double() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return errors


def torch_unet(model: Glyffuser, dtype: torch.dtype = torch.float32) -> Callable[[UNetCall], Tensor]:
    """The eager PyTorch U-Net (autocast for dtypes below FP32): the gate's reference."""

    @torch.inference_mode()
    def run(call: UNetCall) -> Tensor:
        labels = None if call.guidance is None else guidance_labels(call.guidance, len(call.sample), "cpu")
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            return model.unet(
                call.sample,
                call.timestep,
                encoder_hidden_states=call.text,
                encoder_attention_mask=call.mask,
                class_labels=labels,
            ).sample.float()

    return run
