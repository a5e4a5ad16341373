"""OpenVINO models built for this CPU on first use, kept in the artifact cache (a warm start
imports them into `glyph_engine.backends.openvino`):
- the model's entry: the T5 encoder compiled for this CPU;
- the U-Net traced to ONNX (its graph for any input size), an entry of its own: read only to
  compile a size not met before, so a warm start does not read and hash its 18 MB. Its
  GroupNorms are traced without a reshape to groups, in a form chosen per precision
  (`graph_form`);
- one entry per U-Net input size met (rows, text length) and precision: the graph compiled
  for exactly that size, which runs 1.2-1.5x faster than one compiled for any size
  (docs/bench-cpu.md). Compiling one takes under a second and never needs torch's model;
  the least recently used of these entries beyond `KEPT_SIZES` are removed.

An int8 U-Net is quantized by NNCF post-training quantization, calibrated on real sampling
trajectories, and used only when it passes the quality gate (`glyph_engine.quality`); the
gate's verdict is kept with the cache entry. Building samples trajectories through the
pipeline, so it lives here rather than in the backend, which only loads and runs.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version

import openvino as ov
import torch
from torch import Tensor
from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.backends.openvino import (
    OpenVINOBackend,
    UNetForSize,
    compile_config,
    import_blob,
    unet_split,
    unet_streams,
)
from glyph_engine.cache import Artifact, ArtifactCache, ArtifactKey
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.group_norm import use_group_norm
from glyph_engine.model import Glyffuser
from glyph_engine.quality import (
    CALIBRATION_PROMPTS,
    GATE_PROMPTS,
    MAX_UNET_RELATIVE_ERROR,
    UNetCall,
    relative_errors,
    torch_unet,
    trajectory_calls,
)
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_spec, unet_spec
from glyph_engine.to_onnx import TextEncoderForExport, UNetForExport, export_onnx

logger = logging.getLogger(__name__)

KIND = "openvino"
GRAPH_KIND = "openvino-graph"  # the U-Net's ONNX graph (with "-<form>" unless torch's, `graph_form`)
# How far the U-Net with GroupNorm rewritten may stray from torch's GroupNorm in FP32, relative
# to the output's largest value: fp32 rounding gives about 2e-7 on the embedded models; groups
# whose mean is many standard deviations from zero make the sums' E[x^2] - E[x]^2 lose more
# (3e-4 at 30).
REWRITE_TOLERANCE = 1e-5
# The centred form in bf16 rounds x before taking its group's mean away, so its error grows with
# how far a group's mean sits from zero, in the group's standard deviations: on one conv+GN
# layer 0.55% at about 5 (torch's form: 0.34%), 1.5% at about 15. The embedded models' farthest
# group on the check's inputs sits at 4.8; beyond this, bf16 keeps torch's form.
CENTRED_MAX_MEAN = 8.0
SIZED_KIND = "openvino-unet"  # entries of the U-Net compiled for one input size
BUILD_FORMAT = 5  # bump when what a build does changes: older entries are then not used
UNET_GRAPH, UNET, TEXT_ENCODER = "unet.onnx", "unet.blob", "text_encoder.blob"
# Sized U-Net entries kept in a cache (about 19 MB each for the embedded model): generate's
# sizes and a serve replica's batch sizes, for a few prompt lengths.
KEPT_SIZES = 24


def artifact_key(model: Glyffuser, precision: Precision) -> ArtifactKey:
    libraries = ["torch", "openvino"] + (["nncf"] if precision is Precision.int8 else [])
    return ArtifactKey(
        model_sha256=model.sha256,
        kind=KIND,
        precision=precision.value,
        versions=(("glyph-engine", __version__), ("build", str(BUILD_FORMAT)), *[(n, _version(n)) for n in libraries]),
        cpu_flags=cpu_info().flags,
    )


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def sized_key(model: Glyffuser, precision: Precision, size: tuple[int, int], streams: int) -> ArtifactKey:
    """The entry of the U-Net compiled for `size` = (rows, text length) at `precision`, in
    `streams` streams."""
    rows, length = size
    return replace(artifact_key(model, precision), kind=f"{SIZED_KIND}-{rows}x{length}-{streams}s")


def graph_form(precision: Precision) -> str:
    """How the U-Net's graph at `precision` computes its GroupNorms, where the rewrite agrees
    with torch's GroupNorm on the model (`_rewritten_unet`; the graph entry's meta says which
    was traced): "sums" in fp32, "centred" in bf16 (`glyph_engine.group_norm`); "torch" (torch's
    GroupNorm as the ONNX exporter writes it) for int8, whose statistics NNCF would quantize.

    The rewrites have no reshape to groups, so OpenVINO keeps the convolutions' channels-last
    layout through them instead of reordering each norm's input and output: 1.04-1.06x per
    call on the embedded U-Net in fp32 and bf16, 1.12x on the full-size one in bf16
    (docs/bench-cpu.md). bf16 takes the centred form: OpenVINO runs the statistics in bf16,
    where the sums' E[x^2] - E[x]^2 cancels; in fp32 the sums are faster (1.06x against 1.045x
    at 128 rows)."""
    return {Precision.fp32: "sums", Precision.bf16: "centred"}.get(precision, "torch")


def graph_key(model: Glyffuser, precision: Precision) -> ArtifactKey:
    """The entry of the U-Net's ONNX graph in `precision`'s form, for any input size."""
    form = graph_form(precision)
    kind = GRAPH_KIND if form == "torch" else f"{GRAPH_KIND}-{form}"
    return replace(artifact_key(model, Precision.fp32), kind=kind)


def open_openvino(
    model: Glyffuser,
    cache: ArtifactCache,
    precision: Precision,
    progress: bool = False,
) -> tuple[OpenVINOBackend, list[Artifact]]:
    """The backend at `precision` (not auto), from the cache or built into it; also the
    artifacts used, so callers can tell a cold start ("built") from a warm one ("cache").
    U-Nets compiled for one input size are opened when a call first needs them; a round of
    rows runs as `unet_split` requests, `unet_streams` of them at once."""
    core = ov.Core()
    source = cache.get(artifact_key(model, Precision.fp32), lambda: _build(core, model, progress))
    text_encoder = import_blob(core, source.files[TEXT_ENCODER], Precision.fp32)
    used = [source]

    @functools.cache  # read (and its sha256 checked) once, however many sizes are compiled
    def graph(precision: Precision) -> bytes:  # in `precision`'s form (`graph_form`)
        entry = cache.get(graph_key(model, precision), lambda: _build_graph(model, precision, progress))
        return entry.files[UNET_GRAPH]

    if source.source == "built":
        graph(precision)  # a first run traces the U-Net now, with the rest of its build, not at its first step
    if precision is not Precision.int8:
        unets = _sized_unets(core, model, cache, functools.partial(graph, precision), precision)
        return OpenVINOBackend(unets, text_encoder, precision, unet_split(precision), unet_streams(precision)), used

    def build_int8() -> Artifact:
        # The FP32 backend samples the calibration trajectories.
        reference = OpenVINOBackend(
            _sized_unets(core, model, cache, functools.partial(graph, Precision.fp32), Precision.fp32),
            text_encoder,
            Precision.fp32,
        )
        return _build_int8(core, model, graph(Precision.int8), reference, progress)

    unet = cache.get(artifact_key(model, Precision.int8), build_int8)
    used.append(unet)
    gate = unet.meta["gate"]
    if not gate["passed"]:
        raise GlyphEngineError(
            f"int8 fails the quality gate for this model on this CPU: the U-Net's relative error against "
            f"FP32 reaches {gate['max_relative_error']:.1%} on sampling trajectories (limit "
            f"{gate['limit']:.0%}); use --precision fp32, or auto."
        )
    # NNCF's int8 model stays compiled for any size: it runs only where it passed its gate.
    quantized = import_blob(core, unet.files[UNET], Precision.int8)
    return OpenVINOBackend(lambda size, streams: quantized, text_encoder, precision), used


def _sized_unets(
    core: ov.Core,
    model: Glyffuser,
    cache: ArtifactCache,
    graph_bytes: Callable[[], bytes],
    precision: Precision,
) -> UNetForSize:
    """The backend's `unet_for`: each size's compiled U-Net from the cache, compiled into it
    from the U-Net's graph when missing."""
    graph: list[ov.Model] = []  # read once, when the first size is compiled

    def compile_for(size: tuple[int, int], streams: int) -> Artifact:
        if not graph:
            graph.append(core.read_model(graph_bytes()))
        logger.info("compiling the %s U-Net for %d rows, text length %d (once per size)", precision.value, *size)
        return _compile_sized(core, graph[0], precision, size, streams)

    def unet_for(size: tuple[int, int], streams: int) -> ov.CompiledModel:
        entry = cache.get(sized_key(model, precision, size, streams), lambda: compile_for(size, streams))
        if entry.source == "built":
            cache.prune(f"{SIZED_KIND}-", KEPT_SIZES)
        return import_blob(core, entry.files[UNET], precision, streams)

    return unet_for


def _compile_sized(
    core: ov.Core, graph: ov.Model, precision: Precision, size: tuple[int, int], streams: int
) -> Artifact:
    """The U-Net graph compiled for `size`: the batch axis set to its rows, the text axes to its length."""
    rows, length = size
    model = graph.clone()
    shapes = {}
    for node in model.inputs:
        dims = list(node.get_partial_shape())
        shapes[node.get_any_name()] = [rows, *(length if d.is_dynamic else d.get_length() for d in dims[1:])]
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", compile_config(precision, streams))
    meta = {"precision": precision.value, "rows": rows, "text_length": length, "streams": streams}
    return Artifact(files={UNET: _blob(compiled)}, meta=meta)


def int8_gate(model: Glyffuser, cache: ArtifactCache) -> dict | None:
    """The recorded gate result of an int8 build of `model` on this CPU, if one exists."""
    meta = cache.peek(artifact_key(model, Precision.int8))
    return meta.get("gate") if meta else None


def onnx_bytes(model: Glyffuser, component: str, unet: torch.nn.Module | None = None) -> bytes:
    """The component traced to ONNX in memory, with the export's names and dynamic axes;
    `unet`: a rewritten copy of the U-Net to trace in place of the model's own."""
    if component == "unet":
        module = UNetForExport(model.unet if unet is None else unet)
        spec = unet_spec(model, 1, 1, model.max_text_length)
    else:
        module, spec = TextEncoderForExport(model.text_encoder), text_encoder_spec(model, 1, model.max_text_length)
    buffer = io.BytesIO()
    export_onnx(module, spec, buffer)
    return buffer.getvalue()


def _blob(compiled: ov.CompiledModel) -> bytes:
    return compiled.export_model().getvalue()


def _stages(what: str, total: int, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=f"first run: building the OpenVINO {what} for this CPU",
        unit="stage",
        file=sys.stderr,
        disable=not progress,
    )


def _build(core: ov.Core, model: Glyffuser, progress: bool) -> Artifact:
    """The model's entry: the FP32 T5 encoder."""
    with _stages("text encoder", 1, progress) as bar:
        onnx = core.read_model(onnx_bytes(model, "text_encoder"))
        blob = _blob(core.compile_model(onnx, "CPU", compile_config(Precision.fp32)))
        bar.update()
    return Artifact(files={TEXT_ENCODER: blob}, meta={"precision": Precision.fp32.value})


def _build_graph(model: Glyffuser, precision: Precision, progress: bool) -> Artifact:
    """The U-Net's graph entry: the U-Net traced to ONNX in `precision`'s form, for any input size."""
    with _stages("U-Net graph", 1, progress) as bar:
        form = graph_form(precision)
        unet = None if form == "torch" else _rewritten_unet(model, form)
        graph = onnx_bytes(model, "unet", unet)
        bar.update()
    return Artifact(
        files={UNET_GRAPH: graph},
        meta={"precision": Precision.fp32.value, "group_norm": "torch" if unet is None else form},
    )


def _rewritten_unet(model: Glyffuser, form: str) -> torch.nn.Module | None:
    """A copy of the U-Net with its GroupNorms in `form`, if it computes what the U-Net does
    on this model's weights (within `REWRITE_TOLERANCE`, FP32, random images and text) and,
    for "centred", no group's mean sits beyond `CENTRED_MAX_MEAN` of its standard deviations
    from zero; else None, and the graph keeps torch's GroupNorm."""
    rewritten = copy.deepcopy(model.unet)
    use_group_norm(rewritten, form)
    feed = unet_spec(model, 1, 1, model.max_text_length).make_inputs(
        {"batch": 2, "text_length": min(4, model.max_text_length)}, torch.Generator().manual_seed(0)
    )
    farthest = 0.0

    def measure(norm: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        nonlocal farthest
        groups = inputs[0].float().reshape(len(inputs[0]), norm.num_groups, -1)
        farthest = max(farthest, float((groups.mean(-1).abs() / groups.std(-1).clamp_min(1e-12)).max()))

    norms = [m for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    hooks = [norm.register_forward_pre_hook(measure) for norm in norms]
    try:
        with torch.no_grad():
            reference = UNetForExport(model.unet)(*feed.values())
            error = float((UNetForExport(rewritten)(*feed.values()) - reference).abs().max() / reference.abs().max())
    finally:
        for hook in hooks:
            hook.remove()
    if error > REWRITE_TOLERANCE:
        logger.info("GroupNorm as %s strays %.1e from torch's on this model: the graph keeps torch's", form, error)
        return None
    if form == "centred" and farthest > CENTRED_MAX_MEAN:
        logger.info("A group's mean sits %.0f standard deviations out: bf16 keeps torch's GroupNorm", farthest)
        return None
    return rewritten


def _build_int8(core: ov.Core, model: Glyffuser, graph: bytes, reference: OpenVINOBackend, progress: bool) -> Artifact:
    """Quantizes the U-Net with NNCF, calibrated on trajectories the FP32 model samples, then
    measures the gate on other prompts and seeds. The verdict is kept with the entry, so a
    failing model is refused at once on later runs."""
    try:
        import nncf
    except ImportError:
        raise GlyphEngineError("--precision int8 needs NNCF: pip install 'glyph-engine[int8]'.") from None
    nncf.set_log_level(logging.ERROR)
    with _stages("int8 U-Net", 4, progress) as bar:
        bar.set_postfix_str("calibration trajectories")
        calibration = trajectory_calls(model, reference, CALIBRATION_PROMPTS, 2, seed=1)
        bar.update()
        bar.set_postfix_str("quantizing")
        quantized = nncf.quantize(
            core.read_model(graph),
            nncf.Dataset([call.as_numpy() for call in calibration]),
            subset_size=len(calibration),
            model_type=nncf.ModelType.TRANSFORMER,  # SmoothQuant for the attention matmuls: the most accurate here
        )
        compiled = core.compile_model(quantized, "CPU", compile_config(Precision.int8))
        bar.update()
        bar.set_postfix_str("quality gate")
        gate_calls = trajectory_calls(model, reference, GATE_PROMPTS, 1, seed=2)
        request = compiled.create_infer_request()

        def int8(call: UNetCall) -> Tensor:
            return torch.from_numpy(request.infer(call.as_numpy())[0])

        worst = max(relative_errors(int8, torch_unet(model), gate_calls))
        bar.update()
        bar.set_postfix_str("saving")
        blob = _blob(compiled)
        bar.update()
    gate = {
        "max_relative_error": worst,
        "limit": MAX_UNET_RELATIVE_ERROR,
        "passed": worst <= MAX_UNET_RELATIVE_ERROR,
        "calls": len(gate_calls),
        "prompts": list(GATE_PROMPTS),
    }
    logger.info("int8 quality gate: worst relative error %.4f (limit %.2f)", worst, MAX_UNET_RELATIVE_ERROR)
    return Artifact(files={UNET: blob}, meta={"precision": "int8", "gate": gate})
