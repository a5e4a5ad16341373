"""Prompts to glyphs: text encoding, batched guided sampling (the sampler `settings` names),
pixels out. Settings are resolved against the model once (`GenerationSettings.resolve`);
callers that resolved them already pass the resolved object through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from glyph_engine.backends.base import Backend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser
from glyph_engine.sampler import Predictor, centred, initial_noise, sample_dpmpp
from glyph_engine.schedule import StepCoefficients
from glyph_engine.settings import GenerationSettings, ResolvedSettings, StepImpl, resolved
from glyph_engine.step import select_step


@dataclass(frozen=True)
class Generation:
    images: Tensor  # (N, C, H, W) float32 in [0, 1], white background 1
    prompts: list[str]  # per image
    seeds: list[int]  # per image: its noise depends only on this
    settings: ResolvedSettings  # what it was drawn with (seed: the request's)
    step_impl: StepImpl  # the step implementation that ran


def image_seeds(seed: int, count: int, first: int = 0) -> list[int]:
    """Independent per-image seeds derived from one user seed, for images first .. first + count - 1.

    Image i's noise depends on (seed, i) only: the same seed gives the same images
    whatever the batch size, and seeds s and s + 1 share no images.
    """
    return [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) for i in range(first, first + count)]


def encode_prompts(model: Glyffuser, backend: Backend, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Encodes the distinct prompts once, together: ``(text (P, L, D), mask (P, L))``.

    All prompts of a call share one padded length, so a prompt's images do not depend on
    how the call is split into batches (the U-Net's pooled text embedding sees padding).
    """
    input_ids, mask = model.prompt_tokenizer(prompts)
    return backend.encode_text(input_ids, mask), mask.to(backend.device)


def unconditional_text(model: Glyffuser, backend: Backend, like: Tensor) -> tuple[Tensor, Tensor]:
    """The guidance-free embedding for one prompt slot, shaped like `like` (1, L, D)."""
    length = like.shape[1]
    if model.unconditional == "zeros":
        # All keys equal: the mask has no effect, so attend to every position.
        return torch.zeros_like(like), torch.ones(1, length, dtype=torch.long, device=like.device)
    input_ids, mask = model.prompt_tokenizer([""])
    pad = length - input_ids.shape[1]
    input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=model.prompt_tokenizer.pad_id)
    mask = torch.nn.functional.pad(mask, (0, pad), value=0)
    return backend.encode_text(input_ids, mask), mask.to(like.device)


def _predictor(
    backend: Backend, text: Tensor, mask: Tensor, guided_at: set[int], guidance_input: float | None = None
) -> Predictor:
    """The sampler's view of the backend: x, t -> (eps_cond, eps_uncond or None).

    At timesteps in `guided_at`, `text` and `mask` hold the unconditional rows first, then
    the conditional, and one U-Net call runs both; elsewhere the conditional rows run alone.
    `guidance_input`: a distilled student's scale, fed to its U-Net (one pass, already guided).
    """
    rows = mask.shape[0] // 2 if guided_at else mask.shape[0]  # the conditional rows
    cond_text, cond_mask = text[-rows:], mask[-rows:]
    student = {} if guidance_input is None else {"guidance": guidance_input}

    def predict(x: Tensor, t: int) -> tuple[Tensor, Tensor | None]:
        if t in guided_at:
            eps_uncond, eps_cond = backend.denoise(torch.cat([x, x]), t, text, mask).chunk(2)
            return eps_cond, eps_uncond
        return backend.denoise(x, t, cond_text, cond_mask, **student), None

    return predict


def guided_timesteps(coefficients: Sequence[StepCoefficients], interval: tuple[float, float] | None) -> set[int]:
    """The steps that get guidance: those whose noise level sigma is in (low, high]."""
    if interval is None:
        return {c.timestep for c in coefficients}
    low, high = interval
    return {c.timestep for c in coefficients if low < c.eps_scale <= high}  # eps_scale is the step's sigma


def generate(
    model: Glyffuser,
    backend: Backend,
    prompts: Sequence[str],
    num_per_prompt: int,
    settings: GenerationSettings | ResolvedSettings = GenerationSettings(),
    on_step: Callable[[], None] | None = None,
) -> Generation:
    """Generates `num_per_prompt` glyphs for each prompt, prompt-major.

    All prompts share one padded text length, as in the glyffuser's own sampling loop.
    `on_step` is called after every solver step of every batch (progress bars).
    """
    settings = resolved(settings, model)
    distinct = list(dict.fromkeys(prompts))
    prompt_index = [distinct.index(p) for p in prompts for _ in range(num_per_prompt)]
    return sample_rows(
        model, backend, distinct, prompt_index, image_seeds(settings.seed, len(prompt_index)), settings, on_step
    )


@dataclass(frozen=True)
class Request:
    """Glyphs of one prompt, exactly as `generate(model, backend, [prompt], first + count, seed=seed)`
    draws its images first .. first + count - 1."""

    prompt: str
    count: int
    seed: int = 0
    first: int = 0


def generate_requests(
    model: Glyffuser,
    backend: Backend,
    requests: Sequence[Request],
    settings: GenerationSettings | ResolvedSettings = GenerationSettings(),
    on_step: Callable[[], None] | None = None,
) -> list[Generation]:
    """Runs many requests in shared U-Net calls; returns one Generation per request.

    Each request's images equal those of the request run alone (up to float rounding across
    batch sizes): the U-Net pools the text embedding over every position, padding included,
    so only prompts of one token length can share a call unchanged. Requests are grouped by
    length, and each group runs as one batched sampling (`settings.batch_size` rows at most).
    `settings.seed` is ignored: each request has its own, and its Generation records it.
    """
    settings = resolved(settings, model)
    lengths = [int(n) for n in model.prompt_tokenizer([r.prompt for r in requests])[1].sum(1)]
    results: list[Generation | None] = [None] * len(requests)
    for length in dict.fromkeys(lengths):
        members = [i for i, n in enumerate(lengths) if n == length]
        distinct = list(dict.fromkeys(requests[i].prompt for i in members))
        prompt_index, seeds = [], []
        for i in members:
            prompt_index += [distinct.index(requests[i].prompt)] * requests[i].count
            seeds += image_seeds(requests[i].seed, requests[i].count, requests[i].first)
        group = sample_rows(model, backend, distinct, prompt_index, seeds, settings, on_step)
        start = 0
        for i in members:
            end = start + requests[i].count
            results[i] = replace(
                group,
                images=group.images[start:end],
                prompts=group.prompts[start:end],
                seeds=seeds[start:end],
                settings=replace(settings, seed=requests[i].seed),
            )
            start = end
    return results


def sample_rows(
    model: Glyffuser,
    backend: Backend,
    distinct: list[str],
    prompt_index: list[int],
    seeds: list[int],
    settings: ResolvedSettings,
    on_step: Callable[[], None] | None = None,
) -> Generation:
    """Samples one image per row: row i draws `distinct[prompt_index[i]]` from the noise of `seeds[i]`."""
    text, mask = encode_prompts(model, backend, distinct)
    prompt_index = torch.tensor(prompt_index)
    total = len(prompt_index)
    noise = initial_noise(seeds, model.image_shape)
    if settings.center_noise:
        noise = centred(noise)
    # A distilled student takes the scale as an input: no unconditional pass at all.
    two_passes = settings.guided and not model.guidance_embedding
    if two_passes:
        uncond_text, uncond_mask = unconditional_text(model, backend, text[:1])

    coefficients = settings.sampler.coefficients(model.alphas_cumprod, settings.steps, settings.schedule)
    guided_at = guided_timesteps(coefficients, settings.guidance_interval) if two_passes else set()
    step, step_impl = select_step(settings.step_impl, backend.device, settings.sampler)
    clamp = model.pixel_range if settings.clamp_x0 else None
    batch = settings.batch_size or total
    outputs = []
    for start in range(0, total, batch):
        idx = prompt_index[start : start + batch].to(text.device)
        b = len(idx)
        cond_text, cond_mask = text[idx], mask[idx]
        if guided_at:
            # One U-Net call per guided step: [unconditional; conditional].
            cond_text = torch.cat([uncond_text.expand(b, -1, -1), cond_text])
            cond_mask = torch.cat([uncond_mask.expand(b, -1), cond_mask])
        predict = _predictor(
            backend, cond_text, cond_mask, guided_at, settings.guidance if model.guidance_embedding else None
        )
        x = noise[start : start + b].to(backend.device, torch.float32)
        x = sample_dpmpp(
            predict,
            x,
            coefficients,
            settings.guidance,
            clamp,
            step=step,
            callback=(lambda _: on_step()) if on_step else None,
        )
        outputs.append(x.float().cpu())

    samples = torch.cat(outputs)
    bad = int((~torch.isfinite(samples)).flatten(1).any(1).sum())
    if bad:
        # A silent wrong image is worse than none: NaN weights, or guidance so strong without
        # x0 clamping that values overflow, end here instead of in a grey PNG.
        raise GlyphEngineError(
            f"sampling produced NaN or infinite values in {bad} of {len(samples)} images; the checkpoint's "
            "weights may be damaged, or the guidance too strong (try a lower --guidance or --clamp-x0)."
        )
    low, high = model.pixel_range
    images = ((samples - low) / (high - low)).clamp(0.0, 1.0)
    prompts_out = [distinct[i] for i in prompt_index]
    return Generation(images=images, prompts=prompts_out, seeds=seeds, settings=settings, step_impl=step_impl)
