"""TensorRT: the module adapter, FP16 networks, ahead-of-time engine builds, the runtime's refusals.

Builds run on this CPU with TensorRT-RTX (ahead of time, for SM86: the RTX 3090 the
glyffuser was trained on). Running an engine needs a GPU: those tests are marked `gpu`.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.tensorrt import MODULES, Engine, batch_chunks, load_tensorrt, select_build
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export.engine_build import (
    EngineOptions,
    ensure_engines,
    layer_precisions,
    normalize_target,
    parse_onnx,
)
from glyph_engine.export_manifest import read_manifest

runner = CliRunner()


@pytest.mark.parametrize("import_name, flavour", MODULES)
def test_adapter_loads_each_module(import_name, flavour):
    trt = load_tensorrt(import_name)
    if trt is None:
        pytest.skip(f"{import_name} is not installed here")
    assert trt.flavour == flavour and trt.import_name == import_name
    assert trt.version and hasattr(trt.module, "Builder") and hasattr(trt.module, "OnnxParser")
    assert trt.ahead_of_time == (flavour == "tensorrt_rtx")


@pytest.mark.parametrize("text, target", [("8.6", "sm86"), ("86", "sm86"), ("sm_89", "sm89"), ("12.0", "sm120")])
def test_normalize_target(text, target):
    assert normalize_target(text) == target


def test_bad_targets():
    with pytest.raises(GlyphEngineError, match="not a compute capability"):
        normalize_target("x")
    trt = load_tensorrt()
    if trt is None or not trt.ahead_of_time:
        pytest.skip("needs TensorRT-RTX")
    with pytest.raises(GlyphEngineError, match="cannot target compute capability"):
        trt.compute_capability("sm90")


@pytest.fixture(scope="module")
def trt():
    return load_tensorrt()


@pytest.fixture(scope="module")
def onnx_export(ckpt_path, tmp_path_factory):
    from glyph_engine.checkpoint import load_model
    from glyph_engine.export.exporter import export_model

    out = tmp_path_factory.mktemp("trt") / "export"
    manifest, _ = export_model(load_model(ckpt_path).sha256, lambda: load_model(ckpt_path), out)
    return out, manifest


@pytest.mark.tensorrt
def test_unet_network_is_fp16(trt, onnx_export):
    out, _ = onnx_export
    _, network, _ = parse_onnx(trt, out / "unet.fp16.onnx")
    counts = layer_precisions(trt, network)
    assert counts.get("CONVOLUTION:HALF", 0) > 0 and counts.get("MATRIX_MULTIPLY:HALF", 0) > 0
    assert set(counts) == {"CONVOLUTION:HALF", "MATRIX_MULTIPLY:HALF"}  # nothing left in FP32


@pytest.mark.tensorrt
def test_text_encoder_network_keeps_wo_fp32(trt, onnx_export):
    out, _ = onnx_export
    _, network, _ = parse_onnx(trt, out / "text_encoder.fp16.onnx")
    counts = layer_precisions(trt, network)
    layers = 2  # the tiny T5's depth: one FP32 `wo` per layer
    assert counts == {"MATRIX_MULTIPLY:FLOAT": layers, "MATRIX_MULTIPLY:HALF": counts["MATRIX_MULTIPLY:HALF"]}


@pytest.mark.slow  # about 30 s (TensorRT-RTX builds twice): in `make test-slow`, which CI runs too
@pytest.mark.tensorrt
def test_ahead_of_time_build_and_reuse(trt, onnx_export):
    if not trt.ahead_of_time:
        pytest.skip("ahead-of-time builds need TensorRT-RTX")
    out, manifest = onnx_export
    options = EngineOptions("sm86", ahead_of_time=True)
    manifest, reused = ensure_engines(trt, out, manifest, options, force=False, report=print)
    assert not reused
    build = read_manifest(out)["tensorrt"]["sm86"]
    assert build["version"] == trt.version and build["target"] == "sm86"
    assert build["engines"]["unet"]["profile"]["sample"] == [[1, 1, 32, 32], [32, 1, 32, 32], [128, 1, 32, 32]]
    for engine in build["engines"].values():
        assert (out / engine["path"]).stat().st_size == engine["bytes"] > 100_000
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    _, reused = ensure_engines(trt, out, manifest, options, force=False, report=print)
    assert reused and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # An engine made by another TensorRT version (another key) is rebuilt, never reused.
    stale = json.loads(json.dumps(manifest))
    stale["tensorrt"]["sm86"]["key"] = "made-by-another-version"
    _, reused = ensure_engines(trt, out, stale, options, force=False, report=print)
    assert not reused

    plan = out / build["engines"]["unet"]["path"]
    plan.write_bytes(plan.read_bytes()[:1000])
    messages = []
    manifest, reused = ensure_engines(trt, out, read_manifest(out), options, force=False, report=messages.append)
    assert not reused and any("truncated" in m for m in messages)


@pytest.mark.tensorrt
def test_static_batch_profile(trt, onnx_export):
    if not trt.ahead_of_time:
        pytest.skip("ahead-of-time builds need TensorRT-RTX")
    out, manifest = onnx_export
    manifest, _ = ensure_engines(trt, out, manifest, EngineOptions("sm89", True, static_batch=4), False, print)
    profile = manifest["tensorrt"]["sm89-b4"]["engines"]["unet"]["profile"]
    assert profile["sample"] == [[8, 1, 32, 32]] * 3


@pytest.mark.slow  # about 17 s (a TensorRT-RTX build; the library path is tested above): in `make test-slow`
@pytest.mark.tensorrt
def test_export_cli_builds_engines(ckpt_path, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["export", str(ckpt_path), "-o", str(out), "--precision", "fp16", "--compute-capability", "8.6"]
    )
    assert result.exit_code == 0, result.output
    assert "tensorrt sm86: unet.sm86.plan" in result.output and "CONVOLUTION:HALF" in result.output
    assert (out / "unet.sm86.plan").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tensorrt"], "this machine has none"),
        (["--compute-capability", "banana"], "not a compute capability"),
        (["--static-batch", "0"], "--static-batch"),
    ],
)
def test_export_cli_bad_tensorrt_options(ckpt_path, tmp_path, args, message):
    if load_tensorrt() is None:
        pytest.skip("needs TensorRT")
    import torch

    if torch.cuda.is_available() and args == ["--tensorrt"]:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(ckpt_path), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()  # refused before any ONNX work


def test_generate_tensorrt_without_gpu_is_one_line(ckpt_path, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["generate", "metal", "--ckpt", str(ckpt_path), "--backend", "tensorrt"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: the tensorrt backend needs an NVIDIA GPU with CUDA and this machine has none; "
        "use --backend onnxruntime or --backend torch."
    )


def test_runtime_refuses_engines_for_another_gpu_or_version():
    manifest = {
        "tensorrt": {
            "sm86": {"target": "sm86", "module": "tensorrt_rtx", "version": "1.7", "static_batch": None},
            "sm89-b4": {"target": "sm89", "module": "tensorrt_rtx", "version": "1.7", "static_batch": 4},
        }
    }
    trt = SimpleNamespace(import_name="tensorrt_rtx", version="1.7")
    assert select_build(manifest, trt, "sm86", "ckpt.pt")[0] == "sm86"
    assert select_build(manifest, trt, "sm89", "ckpt.pt")[0] == "sm89-b4"
    with pytest.raises(GlyphEngineError, match="no TensorRT engines for this GPU .sm120.*--tensorrt"):
        select_build(manifest, trt, "sm120", "ckpt.pt")
    newer = SimpleNamespace(import_name="tensorrt_rtx", version="1.8")
    with pytest.raises(GlyphEngineError, match="found: sm86 .tensorrt_rtx 1.7."):
        select_build(manifest, newer, "sm86", "ckpt.pt")


@pytest.mark.parametrize(
    "batch, low, high, sizes",
    [(8, 1, 128, [8]), (300, 1, 128, [128, 128, 44]), (256, 1, 128, [128, 128]), (16, 8, 8, [8, 8])],
)
def test_a_batch_beyond_the_profile_is_split(batch, low, high, sizes):
    assert batch_chunks(batch, low, high) == sizes


@pytest.mark.parametrize("batch, low, high", [(12, 8, 8), (4, 8, 8), (0, 1, 4)])
def test_a_batch_the_profile_cannot_cover_is_refused(batch, low, high):
    with pytest.raises(GlyphEngineError, match=f"takes batches of {low} to {high} and cannot run {batch} rows"):
        batch_chunks(batch, low, high)


class FakeContext:
    """An execution context whose setters fail like TensorRT's do: by returning False."""

    def __init__(self, accept_shape=True, accept_address=True):
        self.accept_shape, self.accept_address = accept_shape, accept_address

    def set_input_shape(self, name, shape):
        return self.accept_shape

    def set_tensor_address(self, name, address):
        return self.accept_address


@pytest.mark.parametrize(
    "context, message",
    [
        (FakeContext(accept_shape=False), "refused input sample of shape .3, 1, 4, 4."),
        (FakeContext(True, False), "refused the address"),
    ],
    ids=["shape", "address"],
)
def test_binding_checks_tensorrt_return_values(context, message):
    import torch

    engine = Engine.__new__(Engine)  # the binding logic alone: no GPU, no plan
    engine.context, engine.outputs = context, []
    with pytest.raises(GlyphEngineError, match=message):
        engine._bind({"sample": torch.zeros(3, 1, 4, 4)})


def test_tensorrt_refuses_fp32_and_says_what_to_use(model, tmp_path):
    """--precision fp32 was accepted and ignored: the engines ran FP16. Refused on any machine."""
    with pytest.raises(GlyphEngineError) as refused:
        create_backend("tensorrt", model, tmp_path, precision="fp32")
    assert str(refused.value) == (
        "--backend tensorrt on a GPU runs --precision fp16 (its engines are built from the FP16 ONNX files), "
        "not fp32; fp32 runs with --backend torch, --backend onnxruntime, --backend openvino or --backend inductor."
    )


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_tensorrt_takes_fp16_and_auto(model, tmp_path, precision):
    """Accepted: on this CPU-only run (the GPU is hidden from unmarked tests) they get as far
    as the GPU check; test_tensorrt_generation_matches_torch runs them on a GPU."""
    with pytest.raises(GlyphEngineError, match="needs an NVIDIA GPU"):
        create_backend("tensorrt", model, tmp_path, precision=precision)


def test_generate_refuses_tensorrt_fp32_in_one_line(ckpt_path, tmp_path):
    """On any machine: the precision is refused before the GPU is looked for."""
    args = ["generate", "metal", "--ckpt", str(ckpt_path), "--backend", "tensorrt", "--precision", "fp32"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --backend tensorrt on a GPU runs --precision fp16")
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "g.png").exists()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_generation_matches_torch(ckpt_path, tmp_path, cuda_graph):
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.backends.tensorrt import TensorRTBackend
    from glyph_engine.checkpoint import load_model
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(ckpt_path), "-o", str(out), "--tensorrt"])
    assert result.exit_code == 0, result.output
    model = load_model(ckpt_path)
    settings = GenerationSettings(steps=20, guidance=4.0, seed=2)
    backend = TensorRTBackend(model, out, cuda_graph)
    assert backend.precision == "fp16"
    ours = generate(model, backend, ["metal"], 4, settings).images.cpu()
    reference = generate(load_model(ckpt_path), TorchBackend(load_model(ckpt_path), "cpu"), ["metal"], 4, settings)
    mse = float(((ours - reference.images) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) >= 30


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_splits_a_batch_beyond_its_profile(ckpt_path, tmp_path):
    """Engines for at most 2 images (U-Net batch 4) still draw 6 guided glyphs in one call."""
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.backends.tensorrt import TensorRTBackend
    from glyph_engine.checkpoint import load_model
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(ckpt_path), "-o", str(out), "--tensorrt", "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    model = load_model(ckpt_path)
    backend = TensorRTBackend(model, out)
    assert backend.engines["unet"].batch_range[1] == 4
    settings = GenerationSettings(steps=10, guidance=4.0, seed=5)
    ours = generate(model, backend, ["metal", "water"], 3, settings).images.cpu()
    reference = generate(model, TorchBackend(model, "cpu"), ["metal", "water"], 3, settings).images
    mse = float(((ours - reference) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) >= 30
