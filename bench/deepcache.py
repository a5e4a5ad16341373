"""DeepCache (Ma et al., CVPR 2024), measured and not adopted: adjacent sampler steps change the
U-Net's deep features little, so a full pass keeps the input of the last up block, and the
next steps run only the shallow path (conv_in, the first down block's layers, the last up
block) around that cache.

On the embedded model the shallow path is 16% of a full pass's work, but the gate fails
(`student_quality.py --deepcache 2,3 --backend torch --precision fp32`, docs/deepcache.md):
a full pass every 2 steps breaks 5.3% of glyphs, every 3 steps 46%, where plain DPM-Solver++
at 14 steps passes for less work than either. So it lives beside the benchmark that measured
it, not in the engine; a torch-backend wrapper is all the measurement needs.

`shallow_unet` is written against diffusers' `UNet2DConditionModel.forward` and checked
against it (tests/test_deepcache.py): given the cache of a full pass at the same input, it
returns that pass's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor


def cache_hook(unet: UNet2DConditionModel, into: dict[str, Tensor]):
    """Records the last up block's input in `into["deep"]` on every full pass; returns the handle."""

    def keep(_module, _args, kwargs):
        into["deep"] = kwargs["hidden_states"]

    return unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)


def shallow_unet(
    unet: UNet2DConditionModel,
    sample: Tensor,
    timesteps: Tensor,
    text: Tensor,
    mask: Tensor,
    deep: Tensor,
    labels: Tensor | None = None,
) -> Tensor:
    """The U-Net's output with its deep part (every block between the first down block's layers
    and the last up block) replaced by `deep`, a full pass's input to the last up block."""
    bias = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)  # as diffusers turns a mask into a bias
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=labels)
    if class_emb is not None:
        emb = emb + class_emb
    # The glyffuser's "text" addition embedding pools the unprojected text into the time embedding.
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs={})
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs={})
    hidden = unet.conv_in(sample)
    skips = [hidden]
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None) or [None] * len(first.resnets)
    for resnet, attention in zip(first.resnets, attentions, strict=True):
        hidden = resnet(hidden, emb)
        if attention is not None:
            hidden = attention(hidden, encoder_hidden_states=text, encoder_attention_mask=bias, return_dict=False)[0]
        skips.append(hidden)

    last = unet.up_blocks[-1]
    # The last up block takes the outputs of conv_in and the first down block's layers, the
    # skips the full pass gives it too (the first block's downsampler feeds deeper blocks only).
    res = tuple(skips[-len(last.resnets) :])
    if getattr(last, "has_cross_attention", False):
        hidden = last(
            hidden_states=deep, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text,
            encoder_attention_mask=bias,
        )  # fmt: skip
    else:
        hidden = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=res)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


@dataclass(frozen=True)
class DeepCacheConfig:
    interval: int = 2  # a full pass every `interval` steps, the shallow path between


class DeepCacheSchedule:
    """Which calls of a sampling run are full: the first of each trajectory, then every
    `interval`-th. A trajectory starts where the timestep rises (the sampler counts down)."""

    def __init__(self, config: DeepCacheConfig):
        self.config = config
        self._last_t: int | None = None
        self._since_full = 0

    def full(self, timestep: int, rows: int, cached_rows: int | None) -> bool:
        new_trajectory = self._last_t is None or timestep >= self._last_t
        self._last_t = timestep
        # A cache of fewer rows (unguided steps before guided ones) cannot serve the call.
        if new_trajectory or cached_rows is None or cached_rows < rows or self._since_full + 1 >= self.config.interval:
            self._since_full = 0
            return True
        self._since_full += 1
        return False


def cached_rows_for(deep: Tensor, rows: int) -> Tensor:
    """The cache's rows for a call of `rows` rows: guided calls put [unconditional;
    conditional] and unguided ones the conditional rows alone, so those are the last rows."""
    return deep if deep.shape[0] == rows else deep[-rows:]


def flop_share(unet: UNet2DConditionModel, sample: Tensor, timesteps: Tensor, text: Tensor, mask: Tensor) -> float:
    """The shallow path's share of a full pass's floating-point operations (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    store: dict[str, Tensor] = {}
    handle = cache_hook(unet, store)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as full:
            unet(sample, timesteps, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)
    finally:
        handle.remove()
    with torch.inference_mode(), FlopCounterMode(display=False) as shallow:
        shallow_unet(unet, sample, timesteps, text, mask, store["deep"])
    return shallow.get_total_flops() / full.get_total_flops()


class DeepCacheBackend:
    """A PyTorch backend whose U-Net runs DeepCache's schedule: full passes keep the cache,
    the calls between them run the shallow path. Text encoding is the wrapped backend's."""

    def __init__(self, inner, config: DeepCacheConfig = DeepCacheConfig()):
        self.inner = inner
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.schedule = DeepCacheSchedule(config)
        self._store: dict[str, Tensor] = {}
        self.calls = {"full": 0, "shallow": 0}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner.encode_text(input_ids, attention_mask)

    @torch.inference_mode()
    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        deep = self._store.get("deep")
        rows = x.shape[0]
        if self.schedule.full(timestep, rows, None if deep is None else deep.shape[0]):
            self.calls["full"] += 1
            handle = cache_hook(self.inner.unet, self._store)
            try:
                return self.inner.denoise(x, timestep, text, mask, guidance)
            finally:
                handle.remove()
        self.calls["shallow"] += 1
        inner = self.inner
        x = x.to(inner.device, inner.dtype)
        timesteps = torch.full((rows,), timestep, dtype=torch.long, device=inner.device)
        labels = None
        if inner.embeds_guidance:
            from glyph_engine.model import guidance_labels

            labels = guidance_labels(guidance, rows, inner.device)
        return shallow_unet(
            inner.unet, x, timesteps, text.to(inner.device, inner.dtype), mask.to(inner.device),
            cached_rows_for(deep, rows), labels,
        )  # fmt: skip
