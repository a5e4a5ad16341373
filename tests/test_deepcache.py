"""bench/deepcache.py (DeepCache, measured, not adopted): its shallow path against diffusers'
own U-Net forward, its schedule, and its backend in the sampling loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the experiment lives beside its benchmark

from deepcache import (  # noqa: E402
    DeepCacheBackend,
    DeepCacheConfig,
    DeepCacheSchedule,
    cache_hook,
    flop_share,
    shallow_unet,
)

from factories import TINY_UNET_CONFIG

# The glyffuser's structure (a plain first down block, the "text" addition embedding), the
# embedded model's (cross-attention from the second block), and one whose outer blocks attend
# to the text, with a student's guidance input as class embedding.
CONFIGS = {
    "glyffuser": TINY_UNET_CONFIG,
    "attention outside": {
        **TINY_UNET_CONFIG,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "class_embed_type": "timestep",
    },
}


def _inputs(unet: UNet2DConditionModel, rows: int = 3, length: int = 7):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, unet.config.sample_size, unet.config.sample_size, generator=generator)
    text = torch.randn(rows, length, unet.config.encoder_hid_dim, generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, 4:] = 0  # padding, which the attention bias must hide
    return x, torch.full((rows,), 420), text, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shallow_path_with_its_own_cache_is_the_full_forward(name):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[name]).eval()
    x, t, text, mask = _inputs(unet)
    labels = torch.full((3,), 4.0) if unet.config.class_embed_type else None
    store = {}
    handle = cache_hook(unet, store)
    with torch.inference_mode():
        full = unet(
            x, t, encoder_hidden_states=text, encoder_attention_mask=mask, class_labels=labels, return_dict=False
        )[0]
        handle.remove()
        shallow = shallow_unet(unet, x, t, text, mask, store["deep"], labels)
        # A stale cache (another input's) must change the output: the cache is really used.
        other = shallow_unet(unet, x, t, text, mask, store["deep"].flip(0), labels)
    torch.testing.assert_close(shallow, full, rtol=1e-5, atol=1e-5)
    assert (other - full).abs().max() > 1e-3


def test_shallow_path_is_a_small_share_of_the_embedded_models_work():
    from glyph_engine.checkpoint import load_model
    from glyph_engine.model import TEACHER_CHECKPOINT

    unet = load_model(TEACHER_CHECKPOINT).unet.eval()
    share = flop_share(unet, *_inputs(unet))
    assert 0.1 < share < 0.2  # 16%: its 32x32 level is one resnet down, two up


def test_schedule_runs_full_passes_at_the_interval_and_at_each_new_trajectory():
    schedule = DeepCacheSchedule(DeepCacheConfig(interval=3))
    timesteps = [999, 900, 800, 700, 600, 500, 400]
    first = [schedule.full(t, 4, None if i == 0 else 4) for i, t in enumerate(timesteps)]
    assert first == [True, False, False, True, False, False, True]
    # The next batch starts again at the top: a full pass, whatever the count.
    assert schedule.full(999, 4, 4) is True
    # A guided call (twice the rows) cannot use an unguided pass's cache.
    assert schedule.full(900, 8, 4) is True
    assert schedule.full(800, 4, 8) is False  # the conditional rows of a guided cache serve


def test_interval_one_is_the_plain_backend_and_longer_ones_skip_deep_passes(model):
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings

    settings = GenerationSettings(steps=6, seed=3)
    plain = generate(model, TorchBackend(model, precision="fp32"), ["metal"], 2, settings).images
    every = DeepCacheBackend(TorchBackend(model, precision="fp32"), DeepCacheConfig(interval=1))
    torch.testing.assert_close(generate(model, every, ["metal"], 2, settings).images, plain)
    assert every.calls == {"full": 6, "shallow": 0}

    cached = DeepCacheBackend(TorchBackend(model, precision="fp32"), DeepCacheConfig(interval=2))
    images = generate(model, cached, ["metal"], 2, settings).images
    assert cached.calls["shallow"] >= 2 and cached.calls["full"] >= 3
    assert torch.isfinite(images).all() and not torch.equal(images, plain)
