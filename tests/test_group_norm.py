"""GroupNorm's rewrites (as per-channel sums, what the inductor backend and OpenVINO's fp32
graph compile; centred, OpenVINO's bf16 graph's) against torch's own GroupNorm: the
glyffuser's group widths, channels-last inputs, activations far from zero mean, no affine,
bf16; and the compiled U-Net has no torch GroupNorm left."""

from __future__ import annotations

import pytest
import torch

from glyph_engine.checkpoint import load_model
from glyph_engine.group_norm import FORMS, SumsGroupNorm, use_group_norm
from glyph_engine.inductor_build import unet_module
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.settings import Precision


def reference_and_rewrite(channels, groups, affine=True, eps=1e-5, seed=0, form="sums"):
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    return norm, FORMS[form](norm)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize(("channels", "groups"), [(32, 32), (64, 32), (96, 32), (192, 32), (12, 4), (8, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rewrites_match_torch_group_norm(channels, groups, channels_last, form):
    norm, sums = reference_and_rewrite(channels, groups, form=form)
    # Mean 4, spread 3: the sums of squares must not cancel the variance away.
    x = torch.randn(3, channels, 9, 7, generator=torch.Generator().manual_seed(channels)) * 3 + 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = norm(x), sums(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.allclose(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_three_dimensional_input_without_affine_and_other_eps(form):
    norm, sums = reference_and_rewrite(16, 4, affine=False, eps=1e-6, form=form)
    x = torch.randn(2, 16, 50) * 0.01  # small variance: eps matters
    with torch.no_grad():
        assert torch.allclose(sums(x), norm(x), rtol=0, atol=1e-4)


def test_bf16_keeps_float32_statistics():
    norm, sums = reference_and_rewrite(96, 32)
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
    assert use_group_norm(torch.nn.Sequential(torch.nn.Linear(2, 2)), "sums") == 0


def test_centred_holds_groups_far_from_zero():
    """Groups 1000 standard deviations out: the sums' E[x^2] - E[x]^2 keeps little of the
    variance in float32, the centred form takes the mean away first and keeps it all."""
    norm, centred = reference_and_rewrite(64, 32, form="centred")
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(1)) + 1000
    parameters = (norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        expected = torch.nn.functional.group_norm(x.double(), 32, *parameters).float()
        errors = {form: float((FORMS[form](norm)(x) - expected).abs().max()) for form in ("centred", "sums")}
    assert errors["centred"] < 1e-3 < errors["sums"], errors
