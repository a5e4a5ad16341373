"""End to end against the glyffuser's own sampling loop (T5, U-Net, diffusers scheduler)."""

import logging
from dataclasses import replace

import pytest
import torch

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.settings import GenerationSettings

from reference import glyffuser_loop


@pytest.mark.parametrize("steps", [2, 20])
def test_matches_glyffuser_loop(model, glyffuser_folder, t5_folder, steps):
    prompts = ["metal; gold", "a kind of fish found in the southern seas", "water"]
    result = generate(
        model, TorchBackend(model, device="cpu"), prompts, 1, GenerationSettings(steps=steps, guidance=1.0, seed=3)
    )
    noise = initial_noise(image_seeds(3, 3), model.image_shape)
    ref = glyffuser_loop(glyffuser_folder, t5_folder, prompts, noise, steps)
    assert 0.05 < float(ref.std())  # a real image, not a constant
    torch.testing.assert_close(result.images, ref, rtol=0, atol=1e-4)


def test_guided_matches_reference_loop(model, glyffuser_folder, t5_folder):
    prompts = ["fire; flame", "heart"]
    result = generate(
        model, TorchBackend(model, device="cpu"), prompts, 1, GenerationSettings(steps=10, guidance=5.0, seed=1)
    )
    ref = glyffuser_loop(
        glyffuser_folder, t5_folder, prompts, initial_noise(image_seeds(1, 2), model.image_shape), 10, guidance=5.0
    )
    unguided = generate(
        model, TorchBackend(model, device="cpu"), prompts, 1, GenerationSettings(steps=10, guidance=1.0, seed=1)
    )
    assert (result.images - unguided.images).abs().max() > 1e-2  # guidance changes the images
    # The guided eps is u + 5 (c - u): float32 rounding differences between our batched
    # [uncond; cond] call and the reference's two calls are amplified up to 5x.
    torch.testing.assert_close(result.images, ref, rtol=0, atol=5e-4)


def test_default_guidance_comes_from_checkpoint(model):
    result = generate(model, TorchBackend(model, device="cpu"), ["wood"], 1, GenerationSettings(steps=1))
    assert result.settings.guidance == 4.0  # conftest converts with default_guidance=4


def test_same_seed_same_images_whatever_the_batch_size(model):
    backend = TorchBackend(model, device="cpu")
    settings = dict(steps=3, guidance=3.0, seed=11)
    whole = generate(model, backend, ["metal", "water"], 3, GenerationSettings(**settings))
    split = generate(model, backend, ["metal", "water"], 3, GenerationSettings(batch_size=2, **settings))
    # Same noise and text; only float rounding may differ: on some CPUs (AVX-512 Xeons) oneDNN
    # picks convolution kernels by batch size, and guidance 3 amplifies that to ~3e-4.
    torch.testing.assert_close(whole.images, split.images, rtol=0, atol=1e-3)
    assert whole.prompts == ["metal"] * 3 + ["water"] * 3
    assert len(set(whole.seeds)) == 6
    other = generate(model, backend, ["metal", "water"], 3, GenerationSettings(steps=3, guidance=3.0, seed=12))
    assert (other.images - whole.images).abs().max() > 1e-2


class CountingBackend(TorchBackend):
    def __init__(self, model):
        super().__init__(model, device="cpu")
        self.encoded: list[int] = []
        self.denoise_batches: list[int] = []

    def encode_text(self, input_ids, attention_mask):
        self.encoded.append(input_ids.shape[0])
        return super().encode_text(input_ids, attention_mask)

    def denoise(self, x, timestep, text, mask):
        self.denoise_batches.append(x.shape[0])
        return super().denoise(x, timestep, text, mask)


def test_each_distinct_prompt_encoded_once_and_cfg_batched(model):
    backend = CountingBackend(model)
    generate(model, backend, ["metal", "water", "metal"], 4, GenerationSettings(steps=3, guidance=2.0, batch_size=6))
    assert backend.encoded == [2]  # one call, two distinct prompts; zeros need no encoding
    # 12 images in batches of 6, each step one U-Net call of 2 x 6 (unconditional + conditional)
    assert backend.denoise_batches == [12] * 3 + [12] * 3


def test_guidance_one_skips_unconditional_pass(model):
    backend = CountingBackend(model)
    generate(model, backend, ["metal"], 2, GenerationSettings(steps=2, guidance=1.0))
    assert backend.denoise_batches == [2, 2]


def test_empty_prompt_unconditional_mode(model):
    model.unconditional = "empty"
    backend = CountingBackend(model)
    empty = generate(model, backend, ["metal"], 2, GenerationSettings(steps=3, guidance=3.0))
    assert backend.encoded == [1, 1]  # the prompt, then the empty prompt
    model.unconditional = "zeros"
    zeros = generate(model, TorchBackend(model, device="cpu"), ["metal"], 2, GenerationSettings(steps=3, guidance=3.0))
    assert (empty.images - zeros.images).abs().max() > 1e-3


def test_long_prompt_truncated_with_warning(model, caplog):
    long_prompt = " ".join(["river"] * 400)
    with caplog.at_level(logging.WARNING):
        result = generate(model, TorchBackend(model, device="cpu"), [long_prompt], 1, GenerationSettings(steps=1))
    assert "truncated to 256" in caplog.text
    assert result.images.shape == (1, 1, 32, 32)


def test_output_in_unit_range_for_other_pixel_ranges(model):
    model.pixel_range = (-1.0, 1.0)
    result = generate(model, TorchBackend(model, device="cpu"), ["metal"], 2, GenerationSettings(steps=2))
    assert float(result.images.min()) >= 0.0 and float(result.images.max()) <= 1.0


def test_clamp_x0_default_comes_from_checkpoint(model):
    backend = TorchBackend(model, device="cpu")
    off = generate(model, backend, ["metal"], 2, GenerationSettings(steps=5, guidance=4.0)).images
    model.clamp_x0 = True
    default = generate(model, backend, ["metal"], 2, GenerationSettings(steps=5, guidance=4.0)).images
    explicit_off = generate(model, backend, ["metal"], 2, GenerationSettings(steps=5, guidance=4.0, clamp_x0=False))
    assert (default - off).abs().max() > 1e-4
    torch.testing.assert_close(explicit_off.images, off, rtol=0, atol=0)


def test_guidance_interval_guides_only_its_noise_levels(model):
    """CFG at the steps whose sigma is in (low, high]; the others run the conditional half."""
    from glyph_engine.pipeline import guided_timesteps
    from glyph_engine.schedule import dpmpp_coefficients

    coefficients = dpmpp_coefficients(model.alphas_cumprod, 10)
    sigmas = [c.eps_scale for c in coefficients]  # falling from ~157 to ~0.1
    interval = (1.0, 20.0)
    inside = [1.0 < s <= 20.0 for s in sigmas]
    assert 0 < sum(inside) < 10
    expected = {c.timestep for c, i in zip(coefficients, inside, strict=True) if i}
    assert guided_timesteps(coefficients, interval) == expected
    backend = CountingBackend(model)
    generate(model, backend, ["metal"], 3, GenerationSettings(steps=10, guidance=4.0, guidance_interval=interval))
    assert backend.denoise_batches == [6 if i else 3 for i in inside]


def test_guidance_interval_limits_are_plain_cfg_and_no_cfg(model):
    backend = TorchBackend(model, device="cpu")

    def images(**settings):
        return generate(model, backend, ["metal", "water"], 2, GenerationSettings(steps=8, seed=4, **settings)).images

    everywhere = images(guidance=4.0, guidance_interval=(0.0, float("inf")))
    torch.testing.assert_close(everywhere, images(guidance=4.0), rtol=0, atol=0)
    nowhere = images(guidance=4.0, guidance_interval=(1e6, 1e7))
    torch.testing.assert_close(nowhere, images(guidance=1.0), rtol=0, atol=0)
    partly = images(guidance=4.0, guidance_interval=(1.0, 20.0))
    assert (partly - everywhere).abs().max() > 1e-3 and (partly - nowhere).abs().max() > 1e-3


def test_the_checkpoint_default_interval_applies_unless_overridden(model):
    model.guidance_interval = (1.0, 20.0)
    backend = CountingBackend(model)
    result = generate(model, backend, ["metal"], 2, GenerationSettings(steps=10, guidance=4.0))
    assert result.settings.guidance_interval == (1.0, 20.0) and 2 in backend.denoise_batches
    backend.denoise_batches.clear()
    everywhere = (0.0, float("inf"))
    settings = GenerationSettings(steps=10, guidance=4.0, guidance_interval=everywhere)
    result = generate(model, backend, ["metal"], 2, settings)
    assert result.settings.guidance_interval == everywhere and backend.denoise_batches == [4] * 10


class FirstInput(TorchBackend):
    """Remembers the images of the first U-Net call: the initial noise."""

    def denoise(self, x, timestep, text, mask):
        self.__dict__.setdefault("first", x.clone())
        return super().denoise(x, timestep, text, mask)


def test_centered_noise_has_zero_mean_per_image(model):
    runs = {}
    for center in (False, True):
        backend = FirstInput(model, device="cpu")
        generate(model, backend, ["metal"], 4, GenerationSettings(steps=2, guidance=1.0, center_noise=center))
        runs[center] = backend.first
    means = runs[True].mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.zeros(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(runs[True], runs[False] - runs[False].mean(dim=(1, 2, 3), keepdim=True))


def test_requests_share_calls_and_draw_what_each_draws_alone(model):
    from glyph_engine.pipeline import Request, generate_requests

    requests = [Request("metal", 2, seed=5), Request("water", 1, seed=9), Request("a kind of fish", 1, seed=5)]
    lengths = model.prompt_tokenizer([r.prompt for r in requests])[1].sum(1).tolist()
    assert lengths[0] == lengths[1] != lengths[2]  # two length groups
    backend = CountingBackend(model)
    settings = GenerationSettings(steps=3, guidance=3.0)
    results = generate_requests(model, backend, requests, settings)
    # The two same-length requests share each step's U-Net call: 2 x (2 + 1) rows, then the other alone.
    assert backend.denoise_batches == [6] * 3 + [2] * 3
    for request, result in zip(requests, results, strict=True):
        alone = generate(model, backend, [request.prompt], request.count, replace(settings, seed=request.seed))
        assert result.prompts == [request.prompt] * request.count and result.seeds == alone.seeds
        torch.testing.assert_close(result.images, alone.images, rtol=0, atol=1e-3)
    assert (results[0].images[0] - results[2].images[0]).abs().max() > 1e-2  # different prompts, different glyphs
