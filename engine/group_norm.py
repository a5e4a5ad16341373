"""GroupNorm rewritten without a reshape to groups, in two forms, for the compilers that run
the U-Net (each keeps torch's parameters, shared with the module it replaces).

`SumsGroupNorm` (inductor; OpenVINO in fp32): inductor lowers `torch.nn.GroupNorm` to a
Welford reduction over each group's (channels, pixels), vectorised along the group's
channels. The convolutions leave their outputs channels-last, and the glyffuser's groups hold
1-6 channels: so every vector load is masked to 2 or 3 lanes and every element pays a Welford
update. In the embedded U-Net's bf16 call at batch 128 the up path's 64- and 96-channel norms
at 32x32 took 15-18 ms each. Here the statistics are sums of x and x*x per channel (one pass,
vectorised along the contiguous channels), summed into groups and spread back to channels by
matrix products with a 0/1 group matrix; the normalisation then reads one scale and shift
per channel. The products keep inductor from fusing the group-to-channel gather into the last
loop, which it cannot vectorise. 2-4x faster on those layers, level elsewhere
(docs/bench-cpu.md, "GroupNorm as sums, freezing and 64-row calls"). Statistics are in
float32 whatever the input's dtype, as torch's own GroupNorm keeps them.

`CentredGroupNorm` (OpenVINO in bf16): OpenVINO runs a graph's element-wise operations and
reductions in bf16 when asked for bf16, so E[x^2] - E[x]^2 cancels (errors of 2% with groups
at mean 0, far more off it). This form takes each group's mean first, then the mean square of
x minus it, and normalises x minus its mean: nothing large is subtracted from anything large.

Both keep OpenVINO from reordering each norm's input and output out of the convolutions'
channels-last layout, which torch's GroupNorm (reshaped into groups for its
InstanceNormalization) makes it do (docs/bench-cpu.md, "GroupNorm without a reshape in
OpenVINO's graphs").
"""

from __future__ import annotations

import torch


class _RewrittenGroupNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias


class SumsGroupNorm(_RewrittenGroupNorm):
    """`torch.nn.GroupNorm`'s maths with the statistics as per-channel sums."""

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


class CentredGroupNorm(_RewrittenGroupNorm):
    """`torch.nn.GroupNorm`'s maths with the statistics in two passes: the groups' means, then
    the mean square of each value less its group's mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        width = channels // self.num_groups
        # average[c, d] = 1/width where channels c and d share a group: (per-channel means) @
        # average gives each channel its group's mean, with no reshape into groups.
        channel = torch.arange(channels, device=x.device) // width
        average = (channel[:, None] == channel).float() / width
        values = x.float()
        pixels = tuple(range(2, x.dim()))
        shape = (batch, channels) + (1,) * len(pixels)
        centred = values - (values.mean(pixels) @ average).view(shape)
        scale = torch.rsqrt((centred * centred).mean(pixels) @ average + self.eps)  # (batch, channels)
        if self.weight is None:
            return (centred * scale.view(shape)).to(x.dtype)
        per_channel = (channels,) + (1,) * len(pixels)
        normalised = centred * (scale * self.weight.float()).view(shape) + self.bias.float().view(per_channel)
        return normalised.to(x.dtype)


FORMS: dict[str, type[_RewrittenGroupNorm]] = {"sums": SumsGroupNorm, "centred": CentredGroupNorm}


def use_group_norm(module: torch.nn.Module, form: str) -> int:
    """Replaces every `torch.nn.GroupNorm` inside `module` (in place) with the rewrite named
    `form` ("sums" or "centred"). Returns how many were replaced."""
    rewrite = FORMS[form]
    replaced = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, name, rewrite(child))
                replaced += 1
    return replaced
