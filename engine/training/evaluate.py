"""Radical hit rate: does "metal" draw glyphs with the metal radical?

For each prompt tied to a radical, generate glyphs, find each one's nearest training glyph
(pixel distance) and count how often that glyph carries the prompt's radical. Compared with
the radical's share of the dataset (the base rate a model ignoring the prompt would get).
The mean nearest-neighbour distance shows copies of training glyphs (distance near 0).

The caption gain says whether the model uses its prompt at all: how much higher the U-Net's
noise-prediction loss on training glyphs is without their captions than with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glyph_engine.backends.base import Backend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser
from glyph_engine.pipeline import encode_prompts, generate, unconditional_text
from glyph_engine.settings import GUIDANCE_OFF, GenerationSettings, ResolvedSettings
from glyph_engine.training.dataset import GlyphSet

# Prompt -> Kangxi radical numbers (the radical and its variant forms share a number:
# 金/钅 167, 水/氵 85, 木 75, 火/灬 86, 艸/艹 140, 手/扌 64, 心/忄 61, 言/讠 149).
RADICAL_PROMPTS: dict[str, int] = {
    "metal": 167,
    "water": 85,
    "wood": 75,
    "fire": 86,
    "grass": 140,
    "hand": 64,
    "heart": 61,
    "speech": 149,
}
# Other words for the same radicals (in the training captions: 70-95% of the glyphs defined
# with each word have its radical), for choosing a setting without tuning it on the gate's
# prompts: `bench/student_quality.py --prompt-set held-out`.
HELD_OUT_PROMPTS: dict[str, int] = {
    "iron": 167,
    "river": 85,
    "tree": 75,
    "burn": 86,
    "herb": 140,
    "grasp": 64,
    "fear": 61,
    "talk": 149,
}


@dataclass(frozen=True)
class RadicalResult:
    prompt: str
    radical: int
    hit_rate: float
    base_rate: float
    mean_nn_distance: float  # RMS pixel difference in [0, 1] to the nearest training glyph
    broken_share: float  # of samples that are a grey page or speckle (`is_broken`)
    nn_distance_se: float = 0.0  # standard error of mean_nn_distance (its samples' spread / sqrt(n))

    @property
    def lift(self) -> float:
        return self.hit_rate / self.base_rate if self.base_rate else float("inf")


def is_broken(images: np.ndarray) -> np.ndarray:
    """Per image in [0, 1] (white 1): a grey background (median pixel below 0.8) or speckle
    (over a quarter of the pixels mid-grey) instead of ink on white (docs/broken-samples.md)."""
    flat = images.reshape(len(images), -1)
    return (np.median(flat, 1) < 0.8) | (((flat > 0.15) & (flat < 0.85)).mean(1) > 0.25)


def nearest(samples: np.ndarray, train: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Index of and RMS distance to the nearest training image, for each sample (floats in [0, 1])."""
    a = torch.from_numpy(samples.reshape(len(samples), -1)).float()
    best_d = torch.full((len(a),), float("inf"))
    best_i = torch.zeros(len(a), dtype=torch.long)
    for start in range(0, len(train), chunk):
        b = torch.from_numpy(train[start : start + chunk].reshape(-1, a.shape[1])).float().div_(255)
        d = torch.cdist(a, b)
        value, index = d.min(dim=1)
        better = value < best_d
        best_d[better], best_i[better] = value[better], index[better] + start
    return best_i.numpy(), (best_d / np.sqrt(a.shape[1])).numpy()


def radical_hit_rates(
    model: Glyffuser,
    backend: Backend,
    glyphs: GlyphSet,
    num_samples: int = 64,
    settings: ResolvedSettings | None = None,
    prompts: dict[str, int] = RADICAL_PROMPTS,
) -> list[RadicalResult]:
    """`settings`: resolved against `model`; None: generate's defaults for it."""
    settings = settings or GenerationSettings().resolve(model)
    _, height, width = model.image_shape
    if glyphs.images.shape[1:] != (height, width):
        raise GlyphEngineError(
            f"the dataset's glyphs are {glyphs.images.shape[1]}px and the model draws {height}px; "
            f"build the dataset with --resolution {height}."
        )
    return [
        radical_result(
            prompt, radical, generate(model, backend, [prompt], num_samples, settings).images[:, 0].numpy(), glyphs
        )
        for prompt, radical in prompts.items()
    ]


def radical_result(prompt: str, radical: int, images: np.ndarray, glyphs: GlyphSet) -> RadicalResult:
    """How glyphs `images` (N, H, W) in [0, 1], drawn for `prompt`, score against `radical`."""
    index, distance = nearest(images, glyphs.images)
    hits = glyphs.radicals[index] == radical
    return RadicalResult(
        prompt,
        radical,
        float(hits.mean()),
        float((glyphs.radicals == radical).mean()),
        float(distance.mean()),
        float(is_broken(images).mean()),
        float(distance.std(ddof=1) / np.sqrt(len(distance))) if len(distance) > 1 else 0.0,
    )


def table(results: list[RadicalResult]) -> str:
    lines = [
        "| prompt | radical | hit rate | base rate | lift | mean NN distance | broken |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.prompt} | {r.radical} | {r.hit_rate:.1%} | {r.base_rate:.1%} | {r.lift:.1f}x | "
            f"{r.mean_nn_distance:.3f} | {r.broken_share:.1%} |"
        )
    broken = sum(r.broken_share for r in results) / max(1, len(results))
    return "\n".join(lines) + f"\n\nBroken samples: {broken:.1%} of all."


@dataclass(frozen=True)
class CaptionGain:
    gain: float  # relative rise of the loss without captions; about 0 if prompts are ignored
    glyphs: int
    timesteps: tuple[int, ...]

    def __str__(self) -> str:
        levels = " and ".join(str(t) for t in self.timesteps)
        return (
            f"Caption gain: the U-Net's loss on {self.glyphs} training glyphs (t = {levels}) is "
            f"{self.gain:+.2%} higher without their captions than with them (about 0 if prompts are ignored)."
        )


def caption_gain(
    model: Glyffuser,
    backend: Backend,
    glyphs: GlyphSet,
    count: int = 256,
    timesteps: tuple[int, ...] = (300, 500),
    seed: int = 0,
) -> CaptionGain:
    """Relative increase of the epsilon loss when `count` training glyphs lose their captions
    (the unconditional embedding instead), at noise levels where the glyph is half drawn.
    About 0 for a model that ignores the prompt. A distilled student is asked unguided."""
    rng = np.random.default_rng(seed)
    index = rng.choice(len(glyphs), min(count, len(glyphs)), replace=False)
    x0 = torch.from_numpy(glyphs.images[index]).float().div(255).unsqueeze(1)
    low, high = model.pixel_range
    x0 = (low + (high - low) * x0).to(backend.device)
    text, mask = encode_prompts(model, backend, [str(c) for c in glyphs.captions[index]])
    uncond_text, uncond_mask = unconditional_text(model, backend, text[:1])
    uncond_text, uncond_mask = uncond_text.expand(len(index), -1, -1), uncond_mask.expand(len(index), -1)
    generator = torch.Generator().manual_seed(seed)
    with_caption = without = 0.0
    guidance = GUIDANCE_OFF if model.guidance_embedding else None
    for t in timesteps:
        a = float(model.alphas_cumprod[t])
        noise = torch.randn(x0.shape, generator=generator).to(backend.device)
        noisy = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        with_caption += (backend.denoise(noisy, t, text, mask, guidance).float() - noise).pow(2).mean().item()
        without += (backend.denoise(noisy, t, uncond_text, uncond_mask, guidance).float() - noise).pow(2).mean().item()
    return CaptionGain(without / with_caption - 1, len(index), timesteps)
