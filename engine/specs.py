"""One spec per exported component: tensor names, dynamic axes, shape ranges, sample inputs.

The ONNX export, its validation, the TensorRT build (optimization profiles) and every runtime's
feed (`unet_feed`, `text_encoder_feed`) read these, so names, dtypes and shapes are defined once.

U-Net (`unet`):
    sample                  (batch, C, H, W) float32   noisy images; batch = 2 x images with guidance
    timestep                (batch,)         float32   training timestep, 0..999
    encoder_hidden_states   (batch, text_length, D) float32  T5 output, padded positions zero
    encoder_attention_mask  (batch, text_length) int64 1 for real tokens
    guidance                (batch,)         float32   a distilled student's only: the guidance scale
    -> noise_pred           (batch, C, H, W) float32

Text encoder (`text_encoder`):
    input_ids               (batch, text_length) int64
    attention_mask          (batch, text_length) int64
    -> text_embeddings      (batch, text_length, D) float32, padded positions zeroed in-graph
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glyph_engine.model import Glyffuser

Dim = str | int  # a name for a dynamic axis, a number for a fixed one
Sizes = dict[str, int]  # a value for every dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]
    dtype: str  # numpy name: "float32", "int64"

    def shape(self, sizes: Sizes) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: dict[str, tuple[int, int, int]]  # dynamic axis -> (min, opt, max)
    make_inputs: Callable[[Sizes, torch.Generator], dict[str, torch.Tensor]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min, opt, max) shapes, as TensorRT optimization profiles take them."""
        picks = [{axis: r[k] for axis, r in self.ranges.items()} for k in range(3)]
        return {t.name: tuple(t.shape(p) for p in picks) for t in self.inputs}  # type: ignore[misc]

    def sample_inputs(self, sizes: Sizes, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.make_inputs(sizes, torch.Generator().manual_seed(seed))

    def as_dict(self) -> dict[str, object]:
        return {
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "ranges": {k: list(v) for k, v in self.ranges.items()},
        }


# Names and dtypes (numpy names) of the inputs, in the graphs' order: the same for every model,
# so a runtime builds its feed without one; the specs below add each model's dims.
UNET_INPUTS = (
    ("sample", "float32"),
    ("timestep", "float32"),
    ("encoder_hidden_states", "float32"),
    ("encoder_attention_mask", "int64"),
)
GUIDANCE_INPUT = ("guidance", "float32")  # a distilled student's (Glyffuser.guidance_embedding)
UNET_OUTPUT = "noise_pred"
TEXT_ENCODER_INPUTS = (("input_ids", "int64"), ("attention_mask", "int64"))
TEXT_ENCODER_OUTPUT = "text_embeddings"


def _mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Attention masks with a random amount of right padding (at least one real token)."""
    real = torch.randint(1, length + 1, (batch,), generator=gen)
    real[0] = length  # one row unpadded: the longest prompt of a batch
    return (torch.arange(length)[None, :] < real[:, None]).long()


def unet_spec(model: Glyffuser, max_images: int, opt_images: int, max_text_length: int) -> ComponentSpec:
    channels, height, width = model.image_shape
    dim = model.text_encoder.config.d_model

    inputs = unet_inputs(model.guidance_embedding)

    def make_inputs(sizes: Sizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, n = sizes["batch"], sizes["text_length"]
        mask = _mask(b, n, gen)
        sample = torch.randn(b, channels, height, width, generator=gen)
        timesteps = torch.randint(0, 1000, (b,), generator=gen)
        text = torch.randn(b, n, dim, generator=gen) * 0.2 * mask[..., None]
        guidance = (1 + 9 * torch.rand(b, generator=gen),) if model.guidance_embedding else ()
        return _feed(inputs, (sample, timesteps, text, mask, *guidance), None)

    dims = (("batch", channels, height, width), ("batch",), ("batch", "text_length", dim), ("batch", "text_length"))
    return ComponentSpec(
        name="unet",
        inputs=_tensors(inputs, (*dims, ("batch",))[: len(inputs)]),
        outputs=(TensorSpec(UNET_OUTPUT, ("batch", channels, height, width), "float32"),),
        # x2: guidance runs the unconditional and conditional passes in one batch.
        ranges={"batch": (1, 2 * opt_images, 2 * max_images), "text_length": (1, 16, max_text_length)},
        make_inputs=make_inputs,
    )


def text_encoder_spec(model: Glyffuser, max_prompts: int, max_text_length: int) -> ComponentSpec:
    dim = model.text_encoder.config.d_model
    vocab = model.text_encoder.config.vocab_size

    def make_inputs(sizes: Sizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, n = sizes["batch"], sizes["text_length"]
        mask = _mask(b, n, gen)
        # ids past the sentencepiece pieces are T5's sentinels: real, rarely used tokens.
        ids = torch.randint(3, vocab, (b, n), generator=gen) * mask
        return _feed(TEXT_ENCODER_INPUTS, (ids, mask), None)

    return ComponentSpec(
        name="text_encoder",
        inputs=_tensors(TEXT_ENCODER_INPUTS, (("batch", "text_length"), ("batch", "text_length"))),
        outputs=(TensorSpec(TEXT_ENCODER_OUTPUT, ("batch", "text_length", dim), "float32"),),
        ranges={"batch": (1, 1, max_prompts), "text_length": (1, 16, max_text_length)},
        make_inputs=make_inputs,
    )


def unet_inputs(guidance_embedding: bool) -> tuple[tuple[str, str], ...]:
    """(name, dtype) of a U-Net graph's inputs: a distilled student's take the guidance too."""
    return (*UNET_INPUTS, GUIDANCE_INPUT) if guidance_embedding else UNET_INPUTS


def unet_feed(
    sample: Tensor,
    timestep: int,
    text: Tensor,
    mask: Tensor,
    device: torch.device | str | None = None,
    guidance: float | None = None,
) -> dict[str, Tensor]:
    """One U-Net call as the exported graph takes it: each input by its name, in its dtype, on
    `device` (None: where it is), with the timestep (and a student's `guidance`) repeated for
    every row."""
    rows = (sample.shape[0],)
    timesteps = torch.full(rows, float(timestep), device=device or sample.device)
    scale = () if guidance is None else (torch.full(rows, float(guidance), device=device or sample.device),)
    return _feed(unet_inputs(guidance is not None), (sample, timesteps, text, mask, *scale), device)


def text_encoder_feed(
    input_ids: Tensor, attention_mask: Tensor, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """One T5 call as the exported graph takes it (see `unet_feed`)."""
    return _feed(TEXT_ENCODER_INPUTS, (input_ids, attention_mask), device)


def _feed(
    inputs: Sequence[tuple[str, str]], values: Sequence[Tensor], device: torch.device | str | None
) -> dict[str, Tensor]:
    return {
        name: value.detach().to(device or value.device, getattr(torch, dtype))
        for (name, dtype), value in zip(inputs, values, strict=True)
    }


def _tensors(inputs: Sequence[tuple[str, str]], dims: Sequence[tuple[Dim, ...]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, d, dtype) for (name, dtype), d in zip(inputs, dims, strict=True))
