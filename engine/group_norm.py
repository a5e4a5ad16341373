"""GroupNorm written for inductor: per-channel sums, then groups by two tiny matrix products.

Inductor lowers `torch.nn.GroupNorm` to a Welford reduction over each group's (channels,
pixels), vectorised along the group's channels. The convolutions leave their outputs
channels-last, and the glyffuser's groups hold 1-6 channels: so every vector load is masked
to 2 or 3 lanes and every element pays a Welford update. In the embedded U-Net's bf16 call at
batch 128 the up path's 64- and 96-channel norms at 32x32 took 15-18 ms each.

Here the statistics are sums of x and x*x per channel (one pass, vectorised along the
contiguous channels), summed into groups and spread back to channels by matrix products
with a 0/1 group matrix; the normalisation then reads one scale and shift per channel. The
products keep inductor from fusing the group-to-channel gather into the last loop, which
it cannot vectorise. 2-4x faster on those layers, level elsewhere (docs/bench-cpu.md,
"GroupNorm as sums, freezing and 64-row calls"). Statistics are in float32 whatever the
input's dtype, as torch's own GroupNorm keeps them.
"""

from __future__ import annotations

import torch


class SumsGroupNorm(torch.nn.Module):
    """`torch.nn.GroupNorm`'s maths (same parameters, shared with the module it replaces)
    with the statistics as per-channel sums."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        width = channels // self.num_groups
        # groups[g, c] = 1 where channel c is in group g. Built here, not kept as a buffer: a
        # buffer would be cast to bf16 with the model, and the products must run in float32.
        channel = torch.arange(channels, device=x.device)
        groups = (channel // width == torch.arange(self.num_groups, device=x.device)[:, None]).float()
        values = x.float()
        pixels = tuple(range(2, x.dim()))
        per_channel = torch.stack((values.sum(pixels), (values * values).sum(pixels)), 1)  # (batch, 2, channels)
        count = width * x[0, 0].numel()
        mean, mean_square = (per_channel @ groups.T / count).unbind(1)  # (batch, groups) each
        rstd = torch.rsqrt((mean_square - mean * mean).clamp_min(0) + self.eps)
        scale, centre = (torch.stack((rstd, mean * rstd), 1) @ groups).unbind(1)  # (batch, channels) each
        shift = -centre
        if self.weight is not None:
            weight = self.weight.float()
            scale, shift = scale * weight, shift * weight + self.bias.float()
        shape = (batch, channels) + (1,) * len(pixels)
        return (values * scale.view(shape) + shift.view(shape)).to(x.dtype)


def use_sums_group_norm(module: torch.nn.Module) -> int:
    """Replaces every `torch.nn.GroupNorm` inside `module` (in place) with `SumsGroupNorm`.
    Returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, name, SumsGroupNorm(child))
                replaced += 1
    return replaced
