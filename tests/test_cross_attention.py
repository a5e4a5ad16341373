"""Cross-attention as einsums (what the inductor backend compiles), against diffusers' own
processor in FP32: the embedded U-Net's 8- and 16-wide heads, padded prompts, and only the
attentions it can stand in for."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from glyph_engine.checkpoint import load_model
from glyph_engine.cross_attention import EinsumCrossAttention, use_einsum_cross_attention
from glyph_engine.inductor_build import unet_module
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.settings import Precision
from glyph_engine.to_onnx import UNetForExport


def processors(unet):
    return [m.processor for m in unet.modules() if isinstance(m, Attention)]


def padded_prompts(batch, length, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, 1 + row % length :] = 0  # 1 .. length real tokens
    return torch.randn(batch, length, width, generator=generator) * mask[..., None], mask


@pytest.mark.parametrize("length", [1, 3, 9])
def test_embedded_unet_with_einsum_cross_attention_matches_diffusers(length):
    model = load_model(TEACHER_CHECKPOINT)
    reference, compiled = UNetForExport(model.unet).eval(), unet_module(model, Precision.fp32).eval()
    generator = torch.Generator().manual_seed(length)
    sample = torch.randn(4, *model.image_shape, generator=generator)
    timesteps = torch.tensor([999.0, 500.0, 20.0, 1.0])
    text, mask = padded_prompts(4, length, model.unet.config.cross_attention_dim)
    # Zeroed padding (as T5's output reaches the U-Net) and padding with values in it: the
    # mask must hide those slots from the cross-attention as diffusers' processor does.
    noisy = text + torch.randn(text.shape, generator=generator) * (1 - mask[..., None])
    for prompt in (text, noisy):
        with torch.no_grad():
            expected, got = reference(sample, timesteps, prompt, mask), compiled(sample, timesteps, prompt, mask)
        assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_only_the_cross_attentions_are_replaced_and_the_model_keeps_its_own():
    model = load_model(TEACHER_CHECKPOINT)
    before = [type(p) for p in processors(model.unet)]
    compiled = unet_module(model, Precision.fp32).unet
    crosses = [m for m in compiled.modules() if isinstance(m, Attention) and m.is_cross_attention]
    selves = [m for m in compiled.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert crosses and selves
    assert all(isinstance(m.processor, EinsumCrossAttention) for m in crosses)
    assert not any(isinstance(m.processor, EinsumCrossAttention) for m in selves)  # flash is faster there
    assert [type(p) for p in processors(model.unet)] == before  # unet_module compiled a copy


@pytest.mark.parametrize(
    "options", [{"cross_attention_norm": "layer_norm"}, {"residual_connection": True}, {"rescale_output_factor": 2.0}]
)
def test_attentions_with_extras_keep_diffusers_processor(options):
    attention = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, **options)
    attention.set_processor(AttnProcessor2_0())
    assert use_einsum_cross_attention(attention) == 0
    assert isinstance(attention.processor, AttnProcessor2_0)


def test_a_plain_cross_attention_is_replaced_and_matches():
    attention = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, out_bias=True).eval()
    x = torch.randn(3, 10, 16)
    text, mask = padded_prompts(3, 4, 8)
    bias = (1 - mask[:, None, :].float()) * -10000.0  # as diffusers' Transformer2DModel passes it
    with torch.no_grad():
        expected = attention(x, encoder_hidden_states=text, attention_mask=bias)
        assert use_einsum_cross_attention(attention) == 1
        got = attention(x, encoder_hidden_states=text, attention_mask=bias)
    assert torch.allclose(got, expected, atol=1e-6)
