"""U-Net throughput (images/s) per backend and batch on this machine.

`pytest bench/bench_unet.py --benchmark-only`; each call is one U-Net evaluation of `batch`
images at text length 16, through the same Backend.denoise that generation uses.
"""

import json
import shutil

import pytest
import torch

from glyph_engine.artifacts import MANIFEST
from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.files import sha256_file

CASES = [("tiny", 1), ("tiny", 16), ("tiny", 64), ("full", 1)]


def slimmed_copy(export_dir, target):
    """A copy of the export whose FP32 U-Net went through onnxslim (manifest updated)."""
    onnx = pytest.importorskip("onnx")
    onnxslim = pytest.importorskip("onnxslim")
    shutil.copytree(export_dir, target)
    path = target / "unet.fp32.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["components"]["unet"]["files"]["fp32"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def make_backend(name, model, export_dir, tmp_path):
    if name == "torch":
        return TorchBackend(model)
    if name == "onnxruntime-slim":
        # Graph clean-up stays out of the product unless this shows it beats plain ONNX Runtime.
        export_dir = slimmed_copy(export_dir, tmp_path / "slim")
    return OnnxRuntimeBackend(model, export_dir)


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime", "onnxruntime-slim"])
@pytest.mark.parametrize("size, batch", CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def test_unet(benchmark, bench_model, tmp_path, size, batch, backend_name):
    model, export_dir = bench_model(size)
    backend = make_backend(backend_name, model, export_dir, tmp_path)
    channels, height, width = model.image_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=gen)
    text = torch.randn(batch, 16, model.text_encoder.config.d_model, generator=gen)
    mask = torch.ones(batch, 16, dtype=torch.long)
    benchmark.group = f"U-Net {size} batch {batch}"
    benchmark.extra_info["images"] = batch
    benchmark.pedantic(backend.denoise, args=(x, 500, text, mask), rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
