"""ONNX export: validity, agreement with PyTorch, FP16 islands, the artifact folder's reuse."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import glyph_engine.backend_factory as backend_factory
import glyph_engine.backends.onnx_runtime as onnx_runtime
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.checkpoint import load_model, save_checkpoint
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export.exporter import ExportOptions, export_model
from glyph_engine.export.validate import compare
from glyph_engine.export_manifest import MANIFEST, default_export_dir, open_export, read_manifest
from glyph_engine.files import STAGING_LOCK, owned_staging_dir, remove_stale_staging_dirs
from glyph_engine.pipeline import generate
from glyph_engine.settings import GenerationSettings
from glyph_engine.specs import text_encoder_spec, unet_spec
from glyph_engine.to_onnx import TextEncoderForExport, UNetForExport

runner = CliRunner()


def export(ckpt_path, out, options=None, **kwargs):
    options = options or ExportOptions()
    return export_model(load_model(ckpt_path).sha256, lambda: load_model(ckpt_path), out, options, **kwargs)


@pytest.fixture(scope="session")
def exported(ckpt_path):
    out = default_export_dir(ckpt_path)
    manifest, reused = export(ckpt_path, out)
    assert not reused
    return out, manifest


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_manifest_records_what_was_made(exported, ckpt_path):
    out, manifest = exported
    assert out == ckpt_path.parent / "ckpt-export"
    assert manifest["source"]["sha256"] == load_model(ckpt_path).sha256
    assert manifest["options"]["opset"] == 17
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "glyph-engine"}
    unet = manifest["components"]["unet"]
    assert [t["name"] for t in unet["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"
    ]  # fmt: skip
    assert unet["ranges"]["batch"] == [1, 32, 128]  # 2x images: guidance
    for component in manifest["components"].values():
        for precision in ("fp32", "fp16"):
            assert (out / component["files"][precision]["path"]).is_file()
            validation = component["validation"][precision]
            assert validation["min_cosine"] >= (0.99999 if precision == "fp32" else 0.999)
    assert read_manifest(out) == manifest


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_onnx_is_valid_with_named_dynamic_axes(exported, component):
    out, _ = exported
    model = onnx.load(str(out / f"{component}.fp32.onnx"))
    onnx.checker.check_model(model, full_check=True)
    first = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_param == "batch"


def test_fp32_matches_pytorch_at_untraced_shapes(exported, model):
    out, _ = exported
    spec = unet_spec(model, 64, 16, 256)
    inputs = spec.sample_inputs({"batch": 5, "text_length": 23}, seed=9)
    with torch.no_grad():
        reference = UNetForExport(model.unet)(*inputs.values()).numpy()
    actual = run_onnx(out / "unet.fp32.onnx", inputs).astype(np.float64)  # measured here, not by validate.compare
    assert actual.shape == reference.shape == (5, *model.image_shape)
    assert np.abs(reference - actual).max() < 1e-4
    cosine = (reference.ravel() @ actual.ravel()) / (np.linalg.norm(reference) * np.linalg.norm(actual))
    assert cosine > 0.999999

    spec = text_encoder_spec(model, 64, 256)
    inputs = spec.sample_inputs({"batch": 4, "text_length": 40}, seed=9)
    with torch.no_grad():
        reference = TextEncoderForExport(model.text_encoder)(*inputs.values()).numpy()
    actual = run_onnx(out / "text_encoder.fp32.onnx", inputs)
    assert np.abs(reference - actual).max() < 1e-4
    assert np.all(actual[inputs["attention_mask"].numpy() == 0] == 0)  # padding zeroed in-graph


def test_fp16_text_encoder_on_longest_prompts(exported, model):
    out, _ = exported
    spec = text_encoder_spec(model, 64, 256)
    inputs = spec.sample_inputs({"batch": 2, "text_length": 256}, seed=4)
    inputs["attention_mask"][:] = 1  # every one of the 256 tokens real
    with torch.no_grad():
        reference = TextEncoderForExport(model.text_encoder)(*inputs.values()).numpy()
    actual = run_onnx(out / "text_encoder.fp16.onnx", inputs)
    assert np.isfinite(actual).all()
    assert compare(reference, actual)[1] >= 0.999


def weight_types(path, op_type):
    """Element types of the weight initializers feeding nodes of `op_type`."""
    model = onnx.load(str(path))
    initializers = {i.name: i.data_type for i in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    types = {}
    for node in model.graph.node:
        if node.op_type == op_type:
            for name in node.input[1:2]:
                types[node.name] = initializers.get(name, initializers.get(casts.get(name)))
    return types


def test_fp16_islands(exported):
    out, manifest = exported
    t5 = weight_types(out / "text_encoder.fp16.onnx", "MatMul")
    wo = {k: v for k, v in t5.items() if "/DenseReluDense/wo/" in k}
    attention = {k: v for k, v in t5.items() if "/SelfAttention/q/" in k}
    assert wo and set(wo.values()) == {onnx.TensorProto.FLOAT}  # overflow-prone: FP32
    assert attention and set(attention.values()) == {onnx.TensorProto.FLOAT16}
    assert manifest["components"]["text_encoder"]["fp32_nodes_in_fp16"] > 0
    for op in ("Conv", "MatMul"):
        unet = weight_types(out / "unet.fp16.onnx", op)
        assert unet and set(t for t in unet.values() if t is not None) == {onnx.TensorProto.FLOAT16}


def psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


def test_onnxruntime_generation_matches_torch(exported, model):
    out, _ = exported
    settings = GenerationSettings(steps=20, guidance=4.0, seed=2)
    onnx_images = generate(model, OnnxRuntimeBackend(model, out, device="cpu"), ["metal", "water"], 4, settings).images
    torch_images = generate(model, TorchBackend(model, device="cpu"), ["metal", "water"], 4, settings).images
    assert torch_images.std() > 0.05
    assert psnr(onnx_images, torch_images) >= 40


def test_sessions_are_created_once_per_process(exported, model):
    out, _ = exported
    first, second = OnnxRuntimeBackend(model, out, device="cpu"), OnnxRuntimeBackend(model, out, device="cpu")
    assert first.sessions["unet"] is second.sessions["unet"]


@pytest.mark.gpu
def test_onnxruntime_gpu_fp16_matches_torch(exported, model):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'glyph-engine[onnx-gpu]')")
    out, _ = exported
    backend = OnnxRuntimeBackend(model, out, device="cuda")
    assert backend.device.type == "cuda" and backend.precision == "fp16"
    settings = GenerationSettings(steps=20, guidance=4.0, seed=2)
    gpu = generate(model, backend, ["metal"], 4, settings).images.cpu()
    cpu = generate(model, TorchBackend(model, "cpu"), ["metal"], 4, settings).images
    assert psnr(gpu, cpu) >= 30


@pytest.mark.gpu
def test_onnxruntime_gpu_fp32_runs_the_fp32_files(exported, model):
    """--precision fp32 was accepted and ignored: the GPU sessions still ran the FP16 files."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'glyph-engine[onnx-gpu]')")
    out, _ = exported
    backend = create_backend("onnxruntime", model, out, precision="fp32")
    assert backend.device.type == "cuda" and backend.precision == "fp32"
    settings = GenerationSettings(steps=20, guidance=4.0, seed=2)
    gpu = generate(model, backend, ["metal"], 4, settings).images.cpu()
    cpu = generate(model, TorchBackend(model, "cpu"), ["metal"], 4, settings).images
    assert psnr(gpu, cpu) >= 40  # FP32's bound on the CPU, above FP16's 30


def test_onnxruntime_on_a_cpu_runs_fp32_and_refuses_fp16(exported, model):
    out, _ = exported
    for precision in ("auto", "fp32"):
        assert create_backend("onnxruntime", model, out, precision=precision).precision == "fp32"
    # The FP16 files once ran on the CPU and reported fp16 (the CPU provider computes them in FP32).
    with pytest.raises(GlyphEngineError, match="--backend onnxruntime on a CPU runs --precision fp32, not fp16"):
        OnnxRuntimeBackend(model, out, precision="fp16", device="cpu")


class FakeSession:
    """Stands for an ORT session: the providers it got, the file it opened (no GPU here)."""

    def __init__(self, path, providers):
        self.path, self.providers = path, list(providers)

    def get_providers(self):
        return self.providers


@pytest.fixture
def gpu_providers(monkeypatch):
    """The choice of files where ONNX Runtime's GPU providers load (or, set to False, fail to
    load and leave the CPU provider), with sessions that record what they opened. The
    precision a GPU then runs is measured by the gpu-marked tests above."""
    loads = {"gpu": True}

    def session(path, sha256, providers):
        got = providers if loads["gpu"] else (onnx_runtime.CPU_PROVIDER,)
        return FakeSession(path, got)

    monkeypatch.setattr(onnx_runtime, "_providers", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx_runtime, "_session", session)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return loads


@pytest.mark.parametrize("precision, files", [("auto", "fp16"), ("fp16", "fp16"), ("fp32", "fp32")])
def test_onnxruntime_gpu_opens_the_files_of_the_precision_asked(exported, model, gpu_providers, precision, files):
    out, _ = exported
    backend = create_backend("onnxruntime", model, out, precision=precision)
    assert backend.device.type == "cuda" and backend.precision == files
    assert {Path(s.path).name for s in backend.sessions.values()} == {
        f"unet.{files}.onnx",
        f"text_encoder.{files}.onnx",
    }


def test_onnxruntime_gpu_providers_failing_to_load(exported, model, gpu_providers, caplog):
    """auto falls back to the FP32 files on the CPU, as before; fp16 asked for is refused
    rather than run on the CPU under its name."""
    out, _ = exported
    gpu_providers["gpu"] = False
    with caplog.at_level(logging.WARNING):
        backend = create_backend("onnxruntime", model, out)
    assert backend.device.type == "cpu" and backend.precision == "fp32" and "did not load" in caplog.text
    assert Path(backend.sessions["unet"].path).name == "unet.fp32.onnx"
    with pytest.raises(GlyphEngineError, match="on a CPU runs --precision fp32, not fp16"):
        create_backend("onnxruntime", model, out, precision="fp16")


def test_generate_records_the_onnxruntime_precision_or_refuses_it(ckpt_path, tmp_path, exported):
    args = ["generate", "fire", "--steps", "2", "--ckpt", str(ckpt_path), "--backend", "onnxruntime"]
    result = runner.invoke(app, [*args, "--precision", "fp32", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g.png").text["precision"] == "fp32"
    result = runner.invoke(app, [*args, "--precision", "fp16", "-o", str(tmp_path / "h.png")])
    assert result.exit_code == 2 and result.output.startswith("error: --backend onnxruntime on a CPU runs")
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "h.png").exists()


def test_second_export_does_no_work(exported, ckpt_path):
    out, manifest = exported
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}

    def must_not_load():
        raise AssertionError("an up-to-date export loaded the model")

    again, reused = export_model(manifest["source"]["sha256"], must_not_load, out)
    assert reused and again == manifest
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


@pytest.mark.slow  # about 12 s (three exports): in `make test-slow`, which CI runs too
def test_changed_options_or_checkpoint_rebuild(ckpt_path, tmp_path, model):
    out = tmp_path / "export"
    first, _ = export(ckpt_path, out, ExportOptions(precisions=("fp32",)))
    assert not (out / "unet.fp16.onnx").exists()
    second, reused = export(ckpt_path, out, ExportOptions(precisions=("fp32",), max_images=8, opt_images=8))
    assert not reused and second["components"]["unet"]["ranges"]["batch"] == [1, 16, 16]

    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.5)
    changed = tmp_path / "changed.pt"
    save_checkpoint(model, changed)
    third, reused = export(changed, out, ExportOptions(precisions=("fp32",), max_images=8, opt_images=8))
    assert not reused and third["source"]["sha256"] != second["source"]["sha256"]


@pytest.fixture
def without_openvino(monkeypatch):
    """auto on a CPU without OpenVINO: the export's ONNX Runtime files, or PyTorch."""
    monkeypatch.setattr(backend_factory, "openvino_installed", lambda: False)


def test_truncated_onnx_is_detected(ckpt_path, tmp_path, model, without_openvino):
    out = tmp_path / "export"
    options = ExportOptions(precisions=("fp32",))
    export(ckpt_path, out, options)
    path = out / "unet.fp32.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(GlyphEngineError, match="truncated"):
        OnnxRuntimeBackend(model, out, device="cpu")
    assert create_backend("auto", model, out).name == "torch"  # auto falls back, never crashes

    messages = []
    _, reused = export(ckpt_path, out, options, report=messages.append)
    assert not reused and any("damaged" in m for m in messages)
    OnnxRuntimeBackend(model, out, device="cpu")  # rebuilt and usable


def test_failed_export_leaves_nothing(ckpt_path, tmp_path, monkeypatch):
    import glyph_engine.export.exporter as exporter

    def broken(*args, **kwargs):
        raise GlyphEngineError("validation failed")

    monkeypatch.setattr(exporter, "validate", broken)
    with pytest.raises(GlyphEngineError):
        export(ckpt_path, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_an_export_out_of_tolerance_is_refused_and_leaves_nothing(ckpt_path, tmp_path, monkeypatch):
    """The real validation, on a real ONNX file whose U-Net weights no longer match PyTorch's
    (one initializer shifted after tracing): refused, naming the file, and nothing is kept."""
    import glyph_engine.export.exporter as exporter

    real_export = exporter.export_onnx

    def export_then_damage(module, spec, path, opset):
        real_export(module, spec, path, opset)
        if spec.name == "unet":
            graph = onnx.load(str(path))
            weight = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
            values = onnx.numpy_helper.to_array(weight)
            weight.CopyFrom(onnx.numpy_helper.from_array(values + np.float32(0.05), weight.name))
            onnx.save(graph, str(path))

    monkeypatch.setattr(exporter, "export_onnx", export_then_damage)
    with pytest.raises(GlyphEngineError, match=r"unet.fp32.onnx does not match PyTorch FP32 at .*max abs error"):
        export(ckpt_path, tmp_path / "export", ExportOptions(precisions=("fp32",)))
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_refused(ckpt_path, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(GlyphEngineError, match="not a glyph-engine export"):
        export(ckpt_path, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_auto_follows_the_measured_winner(exported, model, tmp_path, without_openvino):
    out, manifest = exported
    assert create_backend("auto", model, out).name == manifest["cpu_benchmark"]["preferred"]
    copy = tmp_path / "export"
    copy.mkdir()
    for p in out.iterdir():
        os.link(p, copy / p.name)
    for preferred in ("torch", "onnxruntime"):
        edited = dict(manifest, cpu_benchmark={**manifest["cpu_benchmark"], "preferred": preferred})
        (copy / "manifest.json").unlink()
        (copy / "manifest.json").write_text(json.dumps(edited))
        assert create_backend("auto", model, copy).name == preferred
    assert create_backend("auto", model, tmp_path / "none").name == "torch"


def test_export_cli(ckpt_path, tmp_path, exported):
    result = runner.invoke(app, ["export", str(ckpt_path)])
    assert result.exit_code == 0, result.output
    assert "reused" in result.output
    assert "unet          fp16  max abs error" in result.output


def test_export_takes_an_embedded_models_name(ckpt_path, tmp_path, exported, monkeypatch):
    """As every command's --ckpt does; the export goes beside the model's file, where
    generate's ONNX Runtime and TensorRT backends look for it."""
    from glyph_engine.model import EMBEDDED_MODELS

    monkeypatch.setitem(EMBEDDED_MODELS, "tiny-embedded", ckpt_path)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "tiny-embedded"])
    assert result.exit_code == 0, result.output
    assert f"reused {default_export_dir(ckpt_path)}" in result.output


def test_generate_cli_onnxruntime(ckpt_path, tmp_path, exported):
    result = runner.invoke(
        app, ["generate", "fire", "-n", "2", "--steps", "3", "--ckpt", str(ckpt_path), "--backend", "onnxruntime",
              "-o", str(tmp_path / "g.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{tmp}/nope.pt"], "does not exist"),
        (["export", "{ckpt}", "--precision", "fp8"], "unknown precision"),
        (["export", "{ckpt}", "--max-batch", "0"], "--max-batch"),
        (["export", "{ckpt}", "--opset", "3"], "--opset"),
        (["export", "{ckpt}", "-o", "{ckpt}"], "is a file"),
        (["export", "{ckpt}", "-o", "/proc/ckpt-export"], "cannot create a folder in /proc"),
        (["generate", "x", "--ckpt", "{ckpt}", "--backend", "onnxruntime", "--export-dir", "{tmp}/none"], "no export"),
    ],
)
def test_bad_export_input(args, message, tmp_path, ckpt_path):
    result = runner.invoke(app, [a.format(tmp=tmp_path, ckpt=ckpt_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output


# --- damaged exports, verified hashes, leftovers of killed exports --------------------------


@pytest.fixture
def export_copy(exported, ckpt_path, tmp_path):
    """A copy of the checkpoint with a copy of its export at the default place beside it;
    the export says ONNX Runtime is faster, so `--backend auto` takes it when it is intact."""
    ckpt = shutil.copy(ckpt_path, tmp_path / "ckpt.pt")
    out = shutil.copytree(exported[0], default_export_dir(ckpt))
    edit_manifest(lambda m: m["cpu_benchmark"].update(preferred="onnxruntime"))(out)
    return ckpt, out


def edit_manifest(change):
    def edit(out):
        manifest = json.loads((out / MANIFEST).read_text())
        change(manifest)
        (out / MANIFEST).write_text(json.dumps(manifest))

    return edit


def random_onnx_bytes(out):
    path = out / "unet.fp32.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))  # same size: only the hash tells


DAMAGE = {
    "onnx-random-bytes": (random_onnx_bytes, "unet.fp32.onnx has changed since export"),
    "components-a-list": (
        edit_manifest(lambda m: m.update(components=list(m["components"].values()))),
        "manifest.components should be an object, not a list",
    ),
    "bytes-a-string": (
        edit_manifest(lambda m: m["components"]["unet"]["files"]["fp32"].update(bytes="12345")),
        "manifest.components.unet.files.fp32.bytes should be a byte count, not '12345'",
    ),
    "benchmark-a-string": (
        edit_manifest(lambda m: m.update(cpu_benchmark="fast")),
        "manifest.cpu_benchmark should be an object, not text",
    ),
}


def generate_cli(ckpt, out, backend):
    args = ["generate", "fire", "-n", "1", "--steps", "2", "--ckpt", ckpt, "--backend", backend, "-o", out]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("damage", DAMAGE)
def test_onnxruntime_refuses_a_damaged_export(export_copy, tmp_path, damage):
    ckpt, out = export_copy
    make, problem = DAMAGE[damage]
    make(out)
    png = tmp_path / "g.png"
    result = generate_cli(ckpt, png, "onnxruntime")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert problem in result.output and "Traceback" not in result.output
    assert f"run `glyph-engine export {ckpt} --force` to rebuild it" in result.output
    assert not png.exists()


@pytest.mark.parametrize("damage", [None, *DAMAGE])
def test_auto_falls_back_to_torch_on_a_damaged_export(export_copy, tmp_path, damage, caplog, without_openvino):
    ckpt, out = export_copy
    if damage is not None:
        DAMAGE[damage][0](out)
    png = tmp_path / "g.png"
    with caplog.at_level(logging.INFO, logger="glyph_engine"):
        result = generate_cli(ckpt, png, "auto")
    assert result.exit_code == 0, result.output
    used = Image.open(png).text["backend"]
    if damage is None:
        assert used == "onnxruntime"  # the intact copy is used, so a fallback below is the damage's doing
    else:
        assert used == "torch"
        assert "not using the ONNX export" in caplog.text and DAMAGE[damage][1] in caplog.text


@pytest.mark.parametrize("damage", ["onnx-random-bytes", "components-a-list"])
def test_export_rebuilds_a_damaged_export(export_copy, damage):
    ckpt, out = export_copy
    make, problem = DAMAGE[damage]
    make(out)
    result = runner.invoke(app, ["export", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert f"rebuilding {out}" in result.output and problem in result.output
    model = load_model(ckpt)
    assert OnnxRuntimeBackend(model, out, device="cpu").precision == "fp32"


def test_opening_an_export_hashes_only_changed_files(export_copy, monkeypatch):
    import glyph_engine.export_manifest as export_manifest

    ckpt, out = export_copy
    model = load_model(ckpt)
    hashed = []
    real_sha256 = export_manifest.sha256_file
    monkeypatch.setattr(export_manifest, "sha256_file", lambda p: hashed.append(p.name) or real_sha256(p))
    open_export(out, model.sha256, str(ckpt))
    assert sorted(hashed) == sorted(p.name for p in out.glob("*.onnx"))  # the copies: all new to it
    hashed.clear()
    open_export(out, model.sha256, str(ckpt))
    assert hashed == []  # unchanged since they were verified

    # Other bytes of the same size, with the old modification time put back: the change of
    # ctime (which cannot be set back) still marks the file for hashing.
    path = out / "text_encoder.fp16.onnx"
    stat = path.stat()
    path.write_bytes(bytes(b ^ 1 for b in path.read_bytes()))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(GlyphEngineError, match="text_encoder.fp16.onnx has changed since export"):
        open_export(out, model.sha256, str(ckpt))
    assert hashed == ["text_encoder.fp16.onnx"]


def test_verification_records_of_onnx_files_and_engines_coexist(export_copy, monkeypatch):
    """The ONNX files and a TensorRT build are verified by separate calls into one record:
    neither erases the other's stamps, so neither is hashed again on the next open."""
    import glyph_engine.export_manifest as export_manifest

    _, out = export_copy
    manifest = read_manifest(out)
    onnx = export_manifest.onnx_files(manifest)
    first, rest = onnx[:1], onnx[1:]  # stand-ins for the two callers' file lists
    assert export_manifest.damaged_files_cached(out, first) == []
    assert export_manifest.damaged_files_cached(out, rest) == []
    hashed = []
    real_sha256 = export_manifest.sha256_file
    monkeypatch.setattr(export_manifest, "sha256_file", lambda p: hashed.append(p.name) or real_sha256(p))
    assert export_manifest.damaged_files_cached(out, first) == []
    assert export_manifest.damaged_files_cached(out, rest) == []
    assert hashed == []


def make_leftover(parent, name, owner_lock=True):
    folder = parent / name
    (folder / "half").mkdir(parents=True)
    (folder / "half" / "unet.fp32.onnx").write_bytes(b"partial")
    if owner_lock:
        (folder / STAGING_LOCK).touch()  # its owner was killed: nobody holds the lock
    return folder


def test_export_removes_leftovers_of_killed_exports_only(exported, ckpt_path):
    out, _ = exported
    stale = [
        make_leftover(out.parent, f".{out.name}.k1ll3d.partial"),
        make_leftover(out.parent, f".{out.name}.0ld.old"),
        make_leftover(out.parent, f".{out.name}.b3f0re.partial", owner_lock=False),  # from before the locks
    ]
    other = make_leftover(out.parent, ".other-export.x.partial")
    with owned_staging_dir(out, ".partial") as live:
        (live / "unet.fp32.onnx").write_bytes(b"being written")
        messages = []
        _, reused = export(ckpt_path, out, report=messages.append)
        assert reused
        assert not any(folder.exists() for folder in stale)
        assert sum("left by an export that did not finish" in m for m in messages) == 3
        assert (live / "unet.fp32.onnx").read_bytes() == b"being written"  # its owner is alive
    assert not live.exists()
    assert other.exists()  # another target's
    shutil.rmtree(other)


def test_a_staging_folder_taken_before_its_lock_is_replaced(tmp_path, monkeypatch):
    """The moment between creating a staging folder and locking it: a concurrent cleanup may
    remove it, and the owner must notice and make another."""
    import glyph_engine.files as files

    target = tmp_path / "ckpt-export"
    real = files.make_staging_dir
    made = []

    def made_then_cleaned(target, suffix):
        folder = real(target, suffix)
        made.append(folder)
        if len(made) == 1:
            assert remove_stale_staging_dirs(target, (suffix,)) == [folder]
        return folder

    monkeypatch.setattr(files, "make_staging_dir", made_then_cleaned)
    with owned_staging_dir(target, ".partial") as staging:
        assert staging == made[1] and staging.is_dir()
        assert remove_stale_staging_dirs(target, (".partial",)) == []
    assert list(tmp_path.iterdir()) == []


def test_a_killed_owner_leaves_a_staging_folder_that_is_then_removed(tmp_path):
    target = tmp_path / "ckpt-export"
    holds_one = (
        "import sys; from pathlib import Path; from glyph_engine.files import owned_staging_dir\n"
        "with owned_staging_dir(Path(sys.argv[1]), '.partial') as staging:\n"
        "    print(staging, flush=True); sys.stdin.read()\n"
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with subprocess.Popen([sys.executable, "-c", holds_one, str(target)], **pipes) as owner:
        staging = Path(owner.stdout.readline().strip())
        assert staging.is_dir() and remove_stale_staging_dirs(target, (".partial",)) == []  # its owner is alive
        owner.kill()
    assert staging.is_dir()  # nothing cleaned up after the kill...
    assert remove_stale_staging_dirs(target, (".partial",)) == [staging]  # ...until the next export
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "out_exists, fails, error_name, advice",
    [
        (True, "moving out aside", "EBUSY", "it is a mount point"),  # an empty mount point as --out
        (True, "moving the export in", "EBUSY", "it is a mount point"),
        (False, "moving the export in", "EACCES", "is writable, or choose another --out"),
    ],
    ids=["mount-point", "busy-after-moving-aside", "fresh-out-denied"],
)
def test_a_failed_final_move_is_one_line_and_leaves_out_as_it_was(
    ckpt_path, tmp_path, monkeypatch, out_exists, fails, error_name, advice
):
    import errno

    import glyph_engine.export.exporter as exporter

    code = getattr(errno, error_name)

    def quick_build(model, folder, *args):  # the ONNX export itself is not what this tests
        (folder / "unet.fp32.onnx").write_bytes(b"onnx")
        return {}

    out = tmp_path / "mnt"
    if out_exists:
        out.mkdir()
    real_rename, failed = Path.rename, []

    def rename(self, target):
        moving = self == out if fails == "moving out aside" else Path(target) == out
        if moving and not failed:  # only once: putting the previous folder back must work
            failed.append(self)
            raise OSError(code, os.strerror(code))
        return real_rename(self, target)

    monkeypatch.setattr(exporter, "_build", quick_build)
    monkeypatch.setattr(Path, "rename", rename)
    before = sorted(tmp_path.rglob("*"))
    result = runner.invoke(app, ["export", str(ckpt_path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"error: cannot move the finished export into {out} ")
    assert advice in result.output and failed
    assert sorted(tmp_path.rglob("*")) == before  # no staging folder left, `out` as it was
