"""The glyffuser's published sampling loop, written from diffusers and transformers parts
directly: the reference glyph-engine's generation is checked against."""

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, T5EncoderModel


def glyffuser_loop(folder, t5_folder, prompts, noise, steps, guidance=1.0):
    """The published pipeline's loop, written from diffusers/transformers parts directly.

    Guidance (not in the published code) follows the author's description: the
    unconditional pass sees an all-zero text embedding.
    """
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    encoder = T5EncoderModel.from_pretrained(t5_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(t5_folder)
    tokens = tokenizer(prompts, padding="longest", max_length=256, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask
    with torch.no_grad():
        text = encoder(tokens.input_ids, attention_mask=mask).last_hidden_state * mask[..., None]
        scheduler = DPMSolverMultistepScheduler()
        scheduler.set_timesteps(steps)
        image = noise.clone()
        for t in scheduler.timesteps:
            eps = unet(image, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
            if guidance != 1.0:
                eps_uncond = unet(image, t, encoder_hidden_states=torch.zeros_like(text)).sample
                eps = eps_uncond + guidance * (eps - eps_uncond)
            image = scheduler.step(eps, t, image).prev_sample
    return image.clamp(0, 1)
