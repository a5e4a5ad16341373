"""The peer as a whole process: the glyffuser's own sampling loop on the embedded weights.

    python bench/peer_process.py [-n 64] [--steps 20]

diffusers' UNet2DConditionModel and transformers' T5 encoder in an eager loop with
diffusers' DPMSolverMultistepScheduler, classifier-free guidance at the model's default
scale on every step with the batch doubled (unconditional rows: zero embeddings, as the
glyffuser trains condition dropout). `bench/wall_clock.py` times it against `generate`.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DPMSolverMultistepScheduler

from glyph_engine.checkpoint import load_model
from glyph_engine.model import DEFAULT_CHECKPOINT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", default="metal")
    args = parser.parse_args()

    model = load_model(DEFAULT_CHECKPOINT)
    unet, text_encoder, guidance = model.unet, model.text_encoder, model.default_guidance
    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(args.steps)
    tokens = model.tokenizer([args.prompt] * args.n, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        text = torch.cat([torch.zeros_like(text), text])
        mask = torch.cat([torch.ones_like(tokens.attention_mask), tokens.attention_mask])
        image = torch.randn(args.n, *model.image_shape, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            uncond, cond = unet(torch.cat([image, image]), t, text, encoder_attention_mask=mask).sample.chunk(2)
            image = scheduler.step(uncond + guidance * (cond - uncond), t, image).prev_sample
    print(f"peer: {args.n} glyphs, mean pixel {image.clamp(0, 1).mean():.3f}")


if __name__ == "__main__":
    main()
