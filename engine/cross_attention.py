"""Cross-attention over the prompt's few tokens, written as two einsums for inductor.

The glyffuser's heads are 8 or 16 wide and a prompt is a handful of tokens (padded to the
longest in the batch). torch's CPU flash-attention kernel, which `scaled_dot_product_attention`
dispatches to, runs such shapes block by block with tiny matrix products: in the embedded
U-Net's bf16 call at batch 128 the 7 cross-attentions over the 2 tokens of "metal" took
about 100 ms of 620. Written as scores -> softmax -> weighted sum, inductor compiles them
into a few loops instead: 2-5x faster at 256 queries over 3-20 tokens, level with flash at
77 (docs/bench-cpu.md, "Attention in the inductor U-Net"). Self-attention (256 or 64 tokens)
stays on flash, which is faster there.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention


class EinsumCrossAttention:
    """A diffusers attention processor for plain cross-attention (no norms, no residual):
    the same maths as `AttnProcessor2_0`, the attention itself as two einsums."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        batch, length, _ = encoder_hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, head_dim)) * attn.scale
        key, value = (t.unflatten(-1, (attn.heads, head_dim)) for t in (key, value))
        scores = torch.einsum("bnhd,blhd->bnhl", query, key)
        if attention_mask is not None:
            # diffusers' additive mask, one row per (batch, head): laid out as the scores are.
            mask = attn.prepare_attention_mask(attention_mask, length, batch)
            scores = scores + mask.view(batch, attn.heads, 1, length).transpose(1, 2)
        out = torch.einsum("bnhl,blhd->bnhd", scores.softmax(-1), value).flatten(-2)
        return attn.to_out[1](attn.to_out[0](out))


def _plain_cross_attention(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, Attention)
        and module.is_cross_attention
        and module.spatial_norm is None
        and module.group_norm is None
        and module.norm_cross is None
        and getattr(module, "norm_q", None) is None
        and getattr(module, "norm_k", None) is None
        and not module.residual_connection
        and module.rescale_output_factor == 1.0
    )


def use_einsum_cross_attention(unet: torch.nn.Module) -> int:
    """Installs `EinsumCrossAttention` on every plain cross-attention of `unet` (in place);
    the others keep their processor. Returns how many were replaced."""
    replaced = 0
    for module in unet.modules():
        if _plain_cross_attention(module):
            module.set_processor(EinsumCrossAttention())
            replaced += 1
    return replaced
