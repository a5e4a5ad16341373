"""AOTInductor backend for CPUs: runs the U-Net and T5 encoder as compiled by torch inductor
ahead of time (`torch._inductor.aoti_compile_and_package`), imported from the packages
`glyph_engine.inductor_build` builds on first use and keeps in the artifact cache.

Inductor fuses what OpenVINO runs as separate passes over the activations (GroupNorm's
statistics, affine and the SiLU after it; the attention's transposes), which is where the
embedded U-Net spends most of a call on a CPU (docs/bench-cpu.md). Precisions of the U-Net:
fp32, and bf16 (weights and activations in bfloat16, normalisations accumulated in fp32 by
inductor's kernels) where the CPU has BF16 units. T5 runs fp32.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision
from glyph_engine.specs import TEXT_ENCODER_INPUTS, text_encoder_feed, unet_feed, unet_inputs

Runner = Callable[..., Tensor]

# How much one U-Net call should hold: 64 of the embedded glyffuser's 32x32 images in bf16,
# counted in activation bytes. Past that, a compiled call's activations outgrow the cores'
# caches and every row costs more. Per row on the AMX Xeon (docs/bench-cpu.md): bf16 2.30 ms
# at 64-96 rows against 2.54 at 128; fp32, twice the bytes per row, 5.12 ms at 32 rows, 5.48
# at 64 and 6.51 at 128. A guided bf16 batch of 64 images is 128 rows: it runs as two calls.
CALL_BYTES = 64 * 32 * 32 * 2
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def rows_per_call(pixels: int, precision: str) -> int:
    """The most rows of `pixels` (height x width) a call at `precision` should hold."""
    return max(1, CALL_BYTES // (pixels * ELEMENT_BYTES[precision]))


class InductorBackend:
    name = "inductor"
    device = torch.device("cpu")

    def __init__(self, unet: Runner, text_encoder: Runner, precision: Precision):
        self.precision = precision.value
        self._unet = unet
        self._text_encoder = text_encoder

    @torch.inference_mode()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._text_encoder(*text_encoder_feed(input_ids, attention_mask, self.device).values())

    @torch.inference_mode()
    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        # More rows than a call should hold run as equal chunks, one call each.
        calls = max(1, -(-x.shape[0] // rows_per_call(x.shape[-2] * x.shape[-1], self.precision)))
        chunks = zip(x.tensor_split(calls), text.tensor_split(calls), mask.tensor_split(calls), strict=True)
        out = [self._unet(*unet_feed(rows, timestep, t, m, self.device, guidance).values()) for rows, t, m in chunks]
        return out[0] if calls == 1 else torch.cat(out)


# An input's shape as a package was compiled for: each axis's size, None where it is dynamic.
InputDims = list[list[int | None]]


def load_inductor(
    unet: bytes, unet_dims: InputDims, text_encoder: bytes, text_dims: InputDims, precision: Precision, guidance: bool
) -> InductorBackend:
    """The backend of two compiled packages, each with its inputs' dims as built: a U-Net at
    `precision` (taking a student's `guidance` input where it has one) and the FP32 text encoder."""
    return InductorBackend(
        load_package(unet, unet_dims, len(unet_inputs(guidance))),
        load_package(text_encoder, text_dims, len(TEXT_ENCODER_INPUTS)),
        precision,
    )


def load_package(package: bytes, dims: InputDims, inputs: int) -> Runner:
    """A compiled package's model, loaded from `package` (bytes the cache has checked against
    their recorded sha256), taking `inputs` tensors of `dims` and returning one.

    Through torch's C++ loader rather than `torch._inductor.aoti_load_package`, which imports
    inductor and dynamo (1.7 s here) for nothing a load needs. The loader takes a path: the
    bytes are written to a private folder first, so nothing can swap the file between the
    check and the load; it extracts the shared library into its own temporary folder, which
    it removes when the model is freed.
    """
    if not _well_formed(dims, inputs):
        raise GlyphEngineError(
            f"a compiled package's recorded input shapes are unusable ({str(dims)[:80]}); rebuild the cache entry."
        )
    with tempfile.TemporaryDirectory(prefix="glyph-engine-aoti-") as folder:
        path = Path(folder) / "model.pt2"
        path.write_bytes(package)
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    spec = json.loads(loader.get_call_spec()[0])  # [version, tree of (args, kwargs)]
    takes = len(spec[1]["children_spec"][0]["children_spec"])
    if takes != inputs:
        raise GlyphEngineError(f"a compiled package takes {takes} inputs, not {inputs}; rebuild the cache entry.")

    def run(*tensors: Tensor) -> Tensor:
        check_shapes(dims, tensors)
        (out,) = loader.boxed_run(list(tensors))
        return out

    return run


def check_shapes(dims: InputDims, tensors: tuple[Tensor, ...]) -> None:
    """Refuses inputs of other static sizes than a package was compiled for. A package checks
    its dynamic sizes (rows, text length) itself, but not its static ones: fed text of another
    width, one ran and returned numbers (seen here), reading memory its kernels were not
    compiled for."""
    for k, (want, tensor) in enumerate(zip(dims, tensors, strict=True)):
        got = tuple(tensor.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
            shape = ", ".join("any" if w is None else str(w) for w in want)
            raise GlyphEngineError(f"a compiled package takes input {k} of shape ({shape}); it was given {got}.")


def _well_formed(dims: object, inputs: int) -> bool:
    return (
        isinstance(dims, list)
        and len(dims) == inputs
        and all(
            isinstance(d, list)
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0) for v in d)
            for d in dims
        )
    )
