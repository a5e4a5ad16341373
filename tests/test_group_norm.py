"""GroupNorm as per-channel sums (what the inductor backend compiles) against torch's own
GroupNorm: the glyffuser's group widths, channels-last inputs, activations far from zero
mean, no affine, bf16; and the compiled U-Net has no torch GroupNorm left."""

from __future__ import annotations

import pytest
import torch

from glyph_engine.checkpoint import load_model
from glyph_engine.group_norm import SumsGroupNorm, use_sums_group_norm
from glyph_engine.inductor_build import unet_module
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.settings import Precision


def reference_and_sums(channels, groups, affine=True, eps=1e-5, seed=0):
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    return norm, SumsGroupNorm(norm)


@pytest.mark.parametrize(("channels", "groups"), [(32, 32), (64, 32), (96, 32), (192, 32), (12, 4), (8, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sums_match_torch_group_norm(channels, groups, channels_last):
    norm, sums = reference_and_sums(channels, groups)
    # Mean 4, spread 3: the sums of squares must not cancel the variance away.
    x = torch.randn(3, channels, 9, 7, generator=torch.Generator().manual_seed(channels)) * 3 + 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = norm(x), sums(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.allclose(got, expected, rtol=0, atol=2e-5)


def test_three_dimensional_input_without_affine_and_other_eps():
    norm, sums = reference_and_sums(16, 4, affine=False, eps=1e-6)
    x = torch.randn(2, 16, 50) * 0.01  # small variance: eps matters
    with torch.no_grad():
        assert torch.allclose(sums(x), norm(x), rtol=0, atol=1e-4)


def test_bf16_keeps_float32_statistics():
    norm, sums = reference_and_sums(96, 32)
    x = (torch.randn(4, 96, 16, 16) * 3 + 4).to(torch.bfloat16)
    with torch.no_grad():
        expected = norm(x.float())
        got = SumsGroupNorm(norm.to(torch.bfloat16))(x)
    assert got.dtype == torch.bfloat16
    # Only the bf16 rounding of the inputs, weights and output: 2**-8 of the values' size.
    assert torch.allclose(got.float(), expected, rtol=0, atol=0.02 * float(expected.abs().max()))


def test_replaces_every_group_norm_sharing_its_parameters():
    model = load_model(TEACHER_CHECKPOINT)
    compiled = unet_module(model, Precision.fp32)
    assert not any(type(m) is torch.nn.GroupNorm for m in compiled.modules())
    sums = [m for m in compiled.modules() if isinstance(m, SumsGroupNorm)]
    norms = [m for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(sums) == len(norms) > 0
    # The model's own U-Net keeps torch's GroupNorm.
    assert all(type(m) is torch.nn.GroupNorm for m in norms)
    assert use_sums_group_norm(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
