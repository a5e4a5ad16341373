"""The peer: the glyffuser's published sampling loop, the yardstick of every speed claim.

T5 encodes the prompts, then diffusers' `UNet2DConditionModel` and
`DPMSolverMultistepScheduler` run in an eager loop, as the glyffuser's pipeline samples
(REFERENCE.md). `glyph-engine bench`, the pytest-benchmark suite, `bench/wall_clock.py`
(through `bench/peer_process.py`) and `make gpu-check` all time this one loop, each at the
guidance scale of the glyph-engine run it is compared with.

The published code has no guidance: at guidance 1 this is that loop, one U-Net pass of the
batch per step. The author describes guidance (the unconditional pass sees an all-zero text
embedding); at any other scale every step runs the batch doubled, unconditional rows first,
made as the model's `unconditional` says, as glyph-engine's pipeline makes them. What
glyph-engine adds (a guidance interval, x0 clamping, centred noise, fused steps) is left out:
it is what the peer is the yardstick for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser, placed
from glyph_engine.settings import GUIDANCE_OFF

# The published pipeline's tokenizer length, whatever the model's own limit.
PUBLISHED_MAX_LENGTH = 256
# The keys of a model's scheduler config that describe its noise schedule; the rest of the
# sampler is `DPMSolverMultistepScheduler()`'s defaults, as in the published pipeline (a
# DDPM config may carry a timestep spacing the published sampler never used).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
PEER_SAMPLER = "dpmpp-2m"  # DPMSolverMultistepScheduler()'s defaults, as glyph-engine's samplers name it
_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Peer:
    """The glyffuser's own loop on one device, its U-Net in one dtype (T5 in FP32: it
    overflows in FP16)."""

    def __init__(self, model: Glyffuser, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """`device` None: where the model's U-Net is. There, in the model's dtype, the peer runs
        the model's own modules (never moved or cast); elsewhere, copies."""
        if model.guidance_embedding:
            raise GlyphEngineError(
                f"{model.source} is a distilled student, which the glyffuser's loop cannot run; give the peer its "
                "teacher's weights (the embedded glyffuser-small for the embedded students)."
            )
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.unet.parameters()).device
        self.dtype = dtype
        self.precision = _PRECISIONS[dtype]
        self.unet = placed(model.unet, self.device, dtype)
        self.text_encoder = placed(model.text_encoder, self.device, torch.float32)
        schedule = {k: v for k, v in model.scheduler_config.items() if k in SCHEDULE_KEYS}
        self.scheduler = DPMSolverMultistepScheduler(**schedule)  # created once, as the pipeline does

    @staticmethod
    def unet_rows(batch: int, steps: int, guidance: float) -> int:
        """U-Net rows one `generate` runs: the batch at every step, doubled when guided."""
        return batch * steps * (1 if guidance == GUIDANCE_OFF else 2)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], noise: Tensor, steps: int, guidance: float) -> Tensor:
        """Images (N, C, H, W) in [0, 1] for prompts[i] from noise[i]; `guidance` 1 is unguided."""
        tokens = self.model.tokenizer(
            list(prompts), padding="longest", max_length=PUBLISHED_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(self.device)
        text = self.encode(tokens.input_ids.to(self.device), mask)
        guided = guidance != GUIDANCE_OFF
        if guided:
            uncond_text, uncond_mask = self.unconditional(text.shape[1])
            text = torch.cat([uncond_text.expand_as(text), text])
            mask = torch.cat([uncond_mask.expand_as(mask), mask])
        self.scheduler.set_timesteps(steps, device=self.device)
        image = noise.to(self.device, self.dtype)
        for t in self.scheduler.timesteps:
            rows = torch.cat([image, image]) if guided else image
            eps = self.unet(rows, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            image = self.scheduler.step(eps, t, image).prev_sample
        return image.clamp(0, 1)

    def encode(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """T5's last hidden state with padded positions zeroed, in the U-Net's dtype."""
        text = self.text_encoder(input_ids, attention_mask=mask).last_hidden_state
        return (text * mask[..., None]).to(self.dtype)

    def unconditional(self, length: int) -> tuple[Tensor, Tensor]:
        """The unconditional embedding and mask (1, length, D), (1, length), as the model's
        `unconditional` says: all zeros (every position attended: all keys are equal), or the
        empty prompt padded to `length`."""
        if self.model.unconditional == "zeros":
            width = self.text_encoder.config.d_model
            text = torch.zeros(1, length, width, device=self.device, dtype=self.dtype)
            return text, torch.ones(1, length, dtype=torch.long, device=self.device)
        tokens = self.model.tokenizer([""], padding="max_length", max_length=length, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        return self.encode(tokens.input_ids.to(self.device), mask), mask
