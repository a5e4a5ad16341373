"""AOTInductor packages built for this CPU on first use: the U-Net and T5 encoder exported
with `torch.export` (dynamic batch and text length), compiled by inductor ahead of time into
shared libraries, and kept in the artifact cache (a warm start loads them into
`glyph_engine.backends.inductor` in milliseconds).

Compiling runs a C++ compiler over the generated kernels: a minute or two on two cores, once
per model, precision, torch version and CPU kind.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.backends.inductor import InductorBackend, load_inductor
from glyph_engine.cache import Artifact, ArtifactCache, ArtifactKey
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.group_norm import use_group_norm
from glyph_engine.model import Glyffuser, placed
from glyph_engine.settings import Precision
from glyph_engine.specs import ComponentSpec, text_encoder_spec, unet_spec
from glyph_engine.to_onnx import TRACE_SIZES, TextEncoderForExport, UNetForExport

KIND = "inductor"
BUILD_FORMAT = 5  # bump when what a build does changes: older entries are then not used
PACKAGE = "model.pt2"
DTYPES = {Precision.bf16: torch.bfloat16}


def artifact_key(model: Glyffuser, component: str, precision: Precision) -> ArtifactKey:
    return ArtifactKey(
        model_sha256=model.sha256,
        kind=f"{KIND}-{component}",
        precision=precision.value,
        versions=(("glyph-engine", __version__), ("build", str(BUILD_FORMAT)), ("torch", version("torch"))),
        cpu_flags=cpu_info().flags,
    )


def open_inductor(
    model: Glyffuser, cache: ArtifactCache, precision: Precision, progress: bool = False
) -> tuple[InductorBackend, list[Artifact]]:
    """The backend with its U-Net at `precision` (fp32 or bf16) and the FP32 text encoder,
    each from the cache or built into it (separate entries: a bf16 U-Net needs no fp32 one);
    also the artifacts used, so callers can tell a cold start ("built") from a warm one ("cache")."""
    text = cache.get(
        artifact_key(model, "text_encoder", Precision.fp32),
        lambda: _build(model, "text_encoder", Precision.fp32, progress),
    )
    unet = cache.get(artifact_key(model, "unet", precision), lambda: _build(model, "unet", precision, progress))
    backend = load_inductor(
        unet.files[PACKAGE],
        unet.meta.get("inputs"),
        text.files[PACKAGE],
        text.meta.get("inputs"),
        precision,
        model.guidance_embedding,
    )
    return backend, [text, unet]


class LowPrecisionUNet(torch.nn.Module):
    """A copy of the export's U-Net (`UNetForExport`) with its weights in `dtype`, the
    activations converted to it on the way in and the output back to float32 (what every
    backend returns). Timesteps and a student's guidance stay float32: bf16 would round
    timestep 999 to 1000, and diffusers embeds both in float32 anyway."""

    def __init__(self, unet: UNetForExport, dtype: torch.dtype):
        super().__init__()
        self.unet = placed(unet, torch.device("cpu"), dtype)
        self.dtype = dtype

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, guidance=None):
        text = encoder_hidden_states.to(self.dtype)
        return self.unet(sample.to(self.dtype), timestep, text, encoder_attention_mask, guidance).float()


def compile_package(module: torch.nn.Module, spec: ComponentSpec) -> bytes:
    """`module` (on positional inputs in `spec`'s order) exported with its dynamic axes and
    compiled by AOTInductor: the package's bytes."""
    # Imported here: they pull in dynamo (1.7 s), which a warm start does not need.
    import torch._inductor
    from torch.export import Dim

    require_compiler()
    inputs = spec.sample_inputs(TRACE_SIZES)
    # Dim.AUTO: torch.export infers each axis's range from the model; the runtime checks it.
    dynamic = tuple({i: Dim.AUTO for i, d in enumerate(t.dims) if isinstance(d, str)} for t in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module.eval(), tuple(inputs[t.name] for t in spec.inputs), dynamic_shapes=dynamic, strict=False
        )
        with tempfile.TemporaryDirectory(prefix="glyph-engine-aoti-") as folder:
            path = Path(folder) / "model.pt2"
            # Freezing: the weights are compile-time constants, so the convolutions and linears
            # run oneDNN kernels on weights packed once, at compile time, biases inside: 1.02-1.08x
            # per U-Net call (docs/bench-cpu.md). The package is built for this CPU kind anyway.
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"freezing": True}
            )
            return path.read_bytes()


def unet_module(model: Glyffuser, precision: Precision) -> torch.nn.Module:
    """What is compiled for the U-Net: a copy of it (the model's own is left as it is) with
    its cross-attention as einsums, which inductor runs 2-5x faster than the flash-attention
    kernel at a prompt's few tokens (`glyph_engine.cross_attention`), and its GroupNorms as
    per-channel sums, which inductor vectorises where its own lowering cannot
    (`glyph_engine.group_norm`), at `precision`."""
    # Imported here: it imports diffusers (1.4 s), which a warm start does not need.
    from glyph_engine.cross_attention import use_einsum_cross_attention

    unet = copy.deepcopy(model.unet)
    use_einsum_cross_attention(unet)
    use_group_norm(unet, "sums")
    return at_precision(UNetForExport(unet), precision)


def at_precision(module: UNetForExport, precision: Precision) -> torch.nn.Module:
    """The export's U-Net as compiled at `precision`: itself in fp32, else a `LowPrecisionUNet`."""
    return module if precision is Precision.fp32 else LowPrecisionUNet(module, DTYPES[precision])


def _build(model: Glyffuser, component: str, precision: Precision, progress: bool) -> Artifact:
    if component == "unet":
        module, spec = unet_module(model, precision), unet_spec(model, 1, 1, model.max_text_length)
    else:
        module, spec = TextEncoderForExport(model.text_encoder), text_encoder_spec(model, 1, model.max_text_length)
    name = "U-Net" if component == "unet" else "text encoder"
    with tqdm(
        total=1,
        desc=f"first run: compiling the {precision.value} {name} for this CPU with inductor (a few minutes, once)",
        file=sys.stderr,
        disable=not progress,
        bar_format="{desc} {elapsed}",
    ) as bar:
        package = compile_package(module, spec)
        bar.update()
    # Each input's static sizes, None on its dynamic axes: a loaded package is held to them.
    dims = [[d if isinstance(d, int) else None for d in t.dims] for t in spec.inputs]
    return Artifact(files={PACKAGE: package}, meta={"precision": precision.value, "inputs": dims})


def require_compiler() -> None:
    """AOTInductor compiles C++: refuse in one line where no compiler is found."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # torch raises its own error types for a missing compiler
        raise GlyphEngineError(
            f"--backend inductor compiles C++ and found no compiler ({e}); install g++ (Debian: apt install g++)."
        ) from None
